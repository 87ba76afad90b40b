//! The child processes of `shardserve up`: started in their own process
//! group (so a terminal's Ctrl-C reaches `up` alone, which then stops them in
//! order) and tied to `up`'s life with `PR_SET_PDEATHSIG` (so they die with
//! it even when it is killed). Their output is forwarded line by line, each
//! line prefixed with the child's name. Which child may end, and what then,
//! is the caller's ([`super::fleet`]) business.

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::MultiProgress;

/// One started child.
struct Supervised {
    name: String,
    child: Child,
}

/// A child that ended on its own.
pub struct Exited {
    pub name: String,
    pub pid: u32,
    pub status: ExitStatus,
}

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) exited: {}",
            self.name,
            self.pid,
            describe(self.status)
        )
    }
}

/// Owns every child; dropping it stops those still running.
pub struct Supervisor {
    children: Vec<Supervised>,
    bars: MultiProgress,
}

impl Supervisor {
    pub fn new(bars: MultiProgress) -> Self {
        Self {
            children: Vec::new(),
            bars,
        }
    }

    /// Starts `command` as the child called `name`; returns its pid.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> Result<u32> {
        let parent = std::process::id() as libc::pid_t;
        // Their lines go through our stderr: colour only when that is a terminal.
        if !std::io::stderr().is_terminal() {
            command.env("NO_COLOR", "1");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // `up` died before the line above: nothing would kill us later.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        if let Some(out) = child.stdout.take() {
            forward(name, out, self.bars.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward(name, err, self.bars.clone());
        }
        self.children.push(Supervised {
            name: name.to_string(),
            child,
        });
        Ok(pid)
    }

    /// The first child found to have ended, if any; it is reaped and forgotten.
    pub fn poll_exited(&mut self) -> Option<Exited> {
        for i in 0..self.children.len() {
            let s = &mut self.children[i];
            if let Ok(Some(status)) = s.child.try_wait() {
                let exited = Exited {
                    name: s.name.clone(),
                    pid: s.child.id(),
                    status,
                };
                self.children.swap_remove(i);
                return Some(exited);
            }
        }
        None
    }

    /// Sends `signal` to child `pid` if it is still ours and running.
    pub fn signal(&mut self, pid: u32, signal: libc::c_int) {
        if let Some(s) = self.children.iter_mut().find(|s| s.child.id() == pid)
            && matches!(s.child.try_wait(), Ok(None))
        {
            // SAFETY: plain kill(2) on our own child's pid; it has not been
            // reaped, so the pid is still ours.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Stops every child, the last started first (the router before the
    /// workers it sends to): SIGTERM, then SIGKILL for those still alive
    /// after `grace`.
    pub fn stop_all(&mut self, grace: Duration) {
        for s in self.children.iter_mut().rev() {
            if matches!(s.child.try_wait(), Ok(None)) {
                // SAFETY: plain kill(2) on our own child's pid; it has not
                // been reaped, so the pid is still ours.
                unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + grace;
        for s in self.children.iter_mut().rev() {
            loop {
                match s.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("{} did not stop in {grace:?}; killing it", s.name);
                        let _ = s.child.kill();
                        let _ = s.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(5));
    }
}

/// Copies a child's output to our stderr, a line at a time, above the
/// progress bars.
fn forward(name: &str, stream: impl Read + Send + 'static, bars: MultiProgress) {
    let prefix = format!("[{name}] ");
    let spawned = std::thread::Builder::new()
        .name(format!("out-{name}"))
        .spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                bars.suspend(|| eprintln!("{prefix}{line}"));
            }
        });
    if let Err(e) = spawned {
        eprintln!("cannot forward the output of {name}: {e}");
    }
}

/// "exit code 1", "killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = match sig {
                libc::SIGHUP => " (SIGHUP)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            };
            format!("killed by signal {sig}{name}")
        }
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_as_words() {
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit code 1");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn a_child_that_ends_is_reported_and_the_rest_are_stopped() {
        let mut sup = Supervisor::new(MultiProgress::new());
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let sleeper_pid = sup.spawn("sleeper", sleeper).unwrap();
        let mut quitter = Command::new("sh");
        quitter.args(["-c", "exit 3"]);
        sup.spawn("quitter", quitter).unwrap();
        let exited = loop {
            if let Some(e) = sup.poll_exited() {
                break e;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(exited.name, "quitter");
        assert!(
            exited.to_string().ends_with("exited: exit code 3"),
            "{exited}"
        );
        sup.stop_all(Duration::from_secs(5));
        // SAFETY: signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(sleeper_pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "the sleeper was stopped and reaped");
    }
}
