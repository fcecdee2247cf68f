//! A smoke run of the benchmark (a few hundred jobs per variant): it checks the
//! invariants after every run and fails on any violation. Timings are reported,
//! never asserted.

use crate::support::amqp_url;

#[tokio::test]
async fn a_small_benchmark_run_keeps_every_invariant() {
    let exe = std::env::current_exe().expect("test binary path");
    let bench = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join("bench");
    assert!(
        bench.exists(),
        "{} is missing: run the tests with `cargo test`",
        bench.display()
    );
    // Its own database, so it can rebuild the bank tables freely.
    let test_db = crate::support::TestDb::new(txq::Backend::MySql).await;
    let out = tokio::process::Command::new(bench)
        .args(["--amqp-url", &amqp_url(), "--database-url", &test_db.url])
        .args([
            "--jobs",
            "200",
            "--runs",
            "1",
            "--concurrency",
            "8",
            "--accounts",
            "50",
        ])
        .output()
        .await
        .expect("running the benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "benchmark failed:\n{stdout}\n{stderr}"
    );
    for variant in ["| txq |", "| ops |", "| bare |", "| broker |", "| db |"] {
        assert!(
            stdout.contains(variant),
            "{variant} missing from the report:\n{stdout}"
        );
    }
    assert!(stdout.contains("txq ÷ bare"), "{stdout}");
}
