//! CPU and memory of processes, from /proc (Linux).

use std::fs;

/// One process's CPU time and peak resident set.
pub(crate) struct ProcStat {
    pub(crate) cpu_seconds: f64,
    pub(crate) peak_rss_kib: u64,
}

/// Clock ticks per second of /proc's counters (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

pub(crate) fn process(pid: u32) -> Option<ProcStat> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some(ProcStat {
        cpu_seconds: cpu_seconds(&pid.to_string())?,
        peak_rss_kib: peak,
    })
}

/// CPU seconds used so far by the services: RabbitMQ (beam.smp) and the
/// databases (mariadbd/mysqld, postgres).
pub(crate) struct Services {
    pub(crate) broker: f64,
    pub(crate) database: f64,
}

pub(crate) fn services() -> Services {
    let mut s = Services {
        broker: 0.0,
        database: 0.0,
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return s;
    };
    for e in entries.flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cpu = || cpu_seconds(&pid).unwrap_or(0.0);
        match comm.trim() {
            "beam.smp" => s.broker += cpu(),
            "mariadbd" | "mysqld" | "postgres" => s.database += cpu(),
            _ => {}
        }
    }
    s
}

/// The machine's CPU time so far from /proc/stat's `cpu` line, in ticks of all
/// CPUs together: how much the hypervisor took (steal) and the total.
#[derive(Clone, Copy)]
pub(crate) struct CpuTimes {
    steal: u64,
    total: u64,
}

pub(crate) fn cpu_times() -> CpuTimes {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal guest guest_nice; guest
    // time is already counted in user and nice.
    let fields: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .unwrap_or_default()
        .split_whitespace()
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    CpuTimes {
        steal: fields.get(7).copied().unwrap_or(0),
        total: fields.iter().sum(),
    }
}

impl CpuTimes {
    /// The share of all CPU time from `earlier` to `self` that was stolen, in %.
    pub(crate) fn steal_pct_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}
