//! CPU time spent by processes, from `/proc` (user + system, all threads): a figure that
//! does not depend on how many cores the machine has, unlike throughput.

/// Clock ticks per second of `/proc/<pid>/stat`.
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `(ppid, utime + stime in ticks)` of `pid`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after its closing parenthesis.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // From the state (field 3): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU seconds used so far by the processes `pids` and their children (nginx's workers).
pub(crate) fn cpu_seconds(pids: &[u32]) -> f64 {
    let mut ticks = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, t)) = stat(pid)
            && (pids.contains(&pid) || pids.contains(&ppid))
        {
            ticks += t;
        }
    }
    ticks as f64 / ticks_per_second()
}

/// CPU seconds per GiB moved.
pub(crate) fn per_gib(seconds: f64, bytes: u64) -> f64 {
    seconds / (bytes as f64 / f64::from(1u32 << 30))
}
