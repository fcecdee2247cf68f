// Validates KEDA objects with @kubernetes-models/keda: validators generated from KEDA's
// own API types (the source of its CRDs' OpenAPI schemas), checking types, enums and
// required fields.   node keda.mjs OBJECTS.json   (a JSON array of manifests)
import { readFileSync } from "node:fs";
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const kinds = { ScaledObject, TriggerAuthentication };
const docs = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const doc of docs) {
  const Model = kinds[doc.kind];
  const name = `${doc.kind}/${doc.metadata?.name}`;
  if (!Model || doc.apiVersion !== "keda.sh/v1alpha1") {
    console.error(`  ${name}: not a keda.sh/v1alpha1 ScaledObject or TriggerAuthentication`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`  ${name}: valid`);
  } catch (e) {
    console.error(`  ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
