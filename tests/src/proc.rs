//! Processes inside a pod (or node): network namespace and cgroup set before exec, ended by PID.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sys::poll;

/// Where a process runs: a network namespace file and a cgroup directory.
#[derive(Clone, Debug)]
pub struct Place {
    /// `/run/netns/NAME`.
    pub netns: PathBuf,
    /// cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Scratch directory for logs.
    pub logs: PathBuf,
}

impl Place {
    /// Builds a command that runs in this place. PR_SET_PDEATHSIG makes the process die with
    /// the harness even if the harness is killed.
    pub fn command(&self, program: impl AsRef<Path>, args: &[&str]) -> Command {
        let netns = File::open(&self.netns)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.netns.display()));
        let procs_path = self.cgroup.join("cgroup.procs");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", procs_path.display()));
        let mut cmd = Command::new(program.as_ref());
        cmd.args(args);
        let (ns_fd, procs_fd): (RawFd, RawFd) = (netns.as_raw_fd(), procs.as_raw_fd());
        // The files must stay open until fork; the closure owns them.
        let keep = (netns, procs);
        // SAFETY: only async-signal-safe calls (setns, write, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let _ = &keep;
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Writing 0 moves the writing process into the cgroup.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a command to completion and returns its stdout; panics with stderr on failure or
    /// after `timeout`.
    pub fn run(&self, program: impl AsRef<Path>, args: &[&str], timeout: Duration) -> String {
        let name = program.as_ref().display().to_string();
        let mut child = self
            .command(&program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let status = match poll_wait(&mut child, timeout) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{name} {} did not finish within {timeout:?}",
                    args.join(" ")
                );
            }
        };
        let (out, err) = (
            out_t.join().unwrap_or_default(),
            err_t.join().unwrap_or_default(),
        );
        assert!(
            status.success(),
            "{name} {} failed ({status}): {err}",
            args.join(" ")
        );
        out
    }
}

fn poll_wait(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A long-running process; killed by PID when dropped.
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    /// Set once its stdout reached end of file (every line captured).
    stdout_closed: Arc<std::sync::atomic::AtomicBool>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout captured line by line and stderr to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let err = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        let out = child.stdout.take().expect("stdout");
        let stdout_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed = stdout_closed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("stdout lock").push(line);
            }
            closed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Self {
            name: name.to_string(),
            child,
            stdout,
            stdout_closed,
            log,
        }
    }

    /// PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stdout line starts with `prefix`; returns it.
    pub fn wait_stdout(&mut self, prefix: &str, timeout: Duration) -> String {
        let what = format!("{} to print `{prefix}`", self.name);
        poll(&what, timeout, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before printing `{prefix}`; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            self.stdout
                .lock()
                .expect("lock")
                .iter()
                .find(|l| l.starts_with(prefix))
                .cloned()
        })
    }

    /// The stderr log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the stderr log contains `needle` `count` times; returns the log.
    pub fn wait_log_count(&mut self, needle: &str, count: usize, timeout: Duration) -> String {
        let what = format!("{} to log `{needle}` {count} time(s)", self.name);
        poll(&what, timeout, || {
            let text = self.log_text();
            if text.matches(needle).count() >= count {
                return Some(text);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) while waiting for `{needle}`; log:\n{text}",
                    self.name
                );
            }
            None
        })
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match poll_wait(&mut self.child, timeout) {
            Some(s) => s,
            None => panic!(
                "{} did not exit within {timeout:?}; log:\n{}",
                self.name,
                self.log_text()
            ),
        }
    }

    /// Every stdout line, once the process has exited and its stdout is read to the end
    /// (the reader thread may still be catching up when the exit is seen).
    pub fn all_stdout(&mut self, timeout: Duration) -> Vec<String> {
        let what = format!("{}'s stdout to be read to its end", self.name);
        poll(&what, timeout, || {
            self.stdout_closed
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        });
        self.stdout_lines()
    }

    /// The stdout lines captured so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal by PID.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        match poll_wait(&mut self.child, timeout) {
            Some(s) => s,
            None => panic!(
                "{} did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.name,
                self.log_text()
            ),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process restarted after it exits, like a kubelet restarting a crashed container.
pub struct Supervised {
    name: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pid: Arc<std::sync::atomic::AtomicU32>,
    restarts: Arc<std::sync::atomic::AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervised {
    /// Runs `make()` and restarts it `delay` after each exit, until dropped. `make` builds the
    /// command each time; `log` receives stderr of all runs (appended).
    pub fn start(
        name: &str,
        delay: Duration,
        log: PathBuf,
        make: impl Fn() -> Command + Send + 'static,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(0));
        let restarts = Arc::new(AtomicU32::new(0));
        let (s, p, r) = (stop.clone(), pid.clone(), restarts.clone());
        let label = name.to_string();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let err = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("supervised log");
                let out = err.try_clone().expect("supervised log");
                let mut child = match make().stdin(Stdio::null()).stdout(out).stderr(err).spawn() {
                    Ok(c) => c,
                    Err(e) => panic!("spawn {label}: {e}"),
                };
                p.store(child.id(), Ordering::SeqCst);
                let _ = child.wait();
                p.store(0, Ordering::SeqCst);
                if s.load(Ordering::SeqCst) {
                    break;
                }
                r.fetch_add(1, Ordering::SeqCst);
                // The kubelet's restart delay: a simulated wait, not a wait for state.
                std::thread::sleep(delay);
            }
        });
        Self {
            name: name.to_string(),
            stop,
            pid,
            restarts,
            thread: Some(thread),
        }
    }

    /// How many times the process was restarted.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::SeqCst);
        // End the current run by PID; the thread then sees `stop` and returns.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(t) = self.thread.as_ref() {
            if t.is_finished() || std::time::Instant::now() > deadline {
                break;
            }
            let pid = self.pid.load(Ordering::SeqCst);
            if pid != 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
