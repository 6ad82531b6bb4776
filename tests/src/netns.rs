//! Real network conditions for end-to-end tests and the WAN bench: each
//! node a real `fedq-node serve` process in its own network namespace,
//! joined to this process's (the coordinator's) namespace by a
//! point-to-point link on a private /30, with delay, jitter and loss each
//! way, and partitions that can be healed.
//!
//! The link is a pair of TUN devices, one in each namespace, and this
//! process moves every IP packet between them ([`Link`]): a packet-level
//! network emulator in user space, doing what `tc qdisc ... netem delay X
//! jitter Y loss Z` does (the kernels these tests run on are built without
//! `sch_netem`: `CONFIG_NET_SCH_NETEM is not set`). Both kernels' TCP
//! stacks see real delays, losses and retransmissions; nothing above IP is
//! touched. A partition drops every packet both ways from that moment,
//! including those already in flight, and keeps connections open (as when
//! a partner's network goes dark); healing restores the shape.
//!
//! Nothing leaves the machine: a node's namespace holds only its end of
//! the link with a host route to ours (in 10.64.0.0/10), and no default
//! route. Everything is removed on drop (also when a test panics): the
//! node processes are killed, the relay stopped (closing a TUN device
//! deletes it) and the namespace deleted. Names carry this process's id,
//! so parallel runs never collide, and namespaces left by a run that was
//! SIGKILLed are removed by the next one ([`sweep_stale`]).
//!
//! Needs root, `ip` with netns support and `/dev/net/tun`:
//! [`unavailable`] says why not, so that tests can skip saying so.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use fedq::client::Federation;
use fedq::federation::{ClientTls, Defaults, FederationConfig, NodeEntry};
use fedq_engine::synth::{self, Partner};
use fedq_node::config::BudgetLimits;
use fedq_pki::{Authority, Role};
use fedq_plan::schema::Schema;

use crate::{connect, node_config, TestNode};

/// Prefix of every namespace made here: `fedq-wan-<pid>-<n>`.
const PREFIX: &str = "fedq-wan-";

/// The port every node listens on (each in its own namespace).
const PORT: u16 = 7443;

/// Why network namespaces cannot be used here, or `None` when they can:
/// not root, no `ip netns`, or no TUN devices. Checked once by making and
/// removing a probe link.
pub fn unavailable() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(|| {
        let uid = Command::new("id").arg("-u").output();
        match uid {
            Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
            Ok(_) => return Some("not running as root (network namespaces need it)".into()),
            Err(e) => return Some(format!("cannot run `id -u`: {e}")),
        }
        Link::create()
            .err()
            .map(|e| format!("cannot make a namespace and its link: {e}"))
    })
    .clone()
}

/// Runs `ip` (or any command); its stderr in the error.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes namespaces made by processes that no longer exist (a run that
/// was killed before its drops ran; its TUN devices went with it).
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            delete_namespace(name);
        }
    }
}

/// Kills every process in namespace `ns`, then deletes it.
fn delete_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = run("ip", &["netns", "del", ns]);
}

/// Delay, jitter and loss of each direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// One-way delay.
    pub delay: Duration,
    /// Each packet's delay is `delay` plus or minus up to this, uniformly
    /// (as netem's `jitter`; packets are not reordered, though).
    pub jitter: Duration,
    /// Packets lost, percent, each way.
    pub loss_percent: f64,
}

impl Shape {
    /// A round trip of `rtt` (half each way), jitter `jitter` each way and
    /// `loss_percent` lost each way.
    pub fn rtt(rtt: Duration, jitter: Duration, loss_percent: f64) -> Shape {
        Shape {
            delay: rtt / 2,
            jitter,
            loss_percent,
        }
    }

    /// No delay, no loss.
    pub fn none() -> Shape {
        Shape::rtt(Duration::ZERO, Duration::ZERO, 0.0)
    }
}

/// What the relay of a link does to packets now.
#[derive(Debug, Clone, Copy)]
struct Conditions {
    shape: Shape,
    /// Partitioned: every packet is dropped, those in flight too.
    cut: bool,
}

/// `TUNSETIFF` (linux/if_tun.h): attach a TUN device to the file.
const TUNSETIFF: u64 = 0x4004_54ca;

/// Opens a new TUN device `name` (IP packets, no packet information
/// header). It lasts as long as the file.
fn open_tun(name: &str) -> Result<File, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
    // struct ifreq: the name (16 bytes), then the flags (a short).
    let mut ifr = [0u8; 40];
    if name.len() >= 16 {
        return Err(format!("device name {name:?} is too long"));
    }
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `ifr` is a valid, writable struct ifreq-sized buffer that
    // outlives the call; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(format!(
            "cannot create TUN device {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// Waits up to `ms` for `file` to be readable.
fn readable(file: &File, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Packets on their way in one direction, each with when it arrives.
type Flight = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

/// One namespace and its link to ours (a TUN device on each side, and the
/// relay threads that carry packets between them under [`Shape`]).
pub struct Link {
    /// The namespace's name.
    pub ns: String,
    /// Our end's address.
    pub host_addr: Ipv4Addr,
    /// The namespace's address (where its node listens).
    pub node_addr: Ipv4Addr,
    conditions: Arc<Mutex<Conditions>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Counts this process's links, for unique names and subnets.
static LINKS: AtomicU32 = AtomicU32::new(0);

impl Link {
    /// A new namespace linked to ours on a /30 of its own, unshaped.
    pub fn create() -> Result<Link, String> {
        sweep_stale();
        let pid = std::process::id();
        let taken = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let (n, host_addr, node_addr) = loop {
            let n = LINKS.fetch_add(1, Ordering::Relaxed);
            // 2^20 subnets of 4 addresses in 10.64.0.0/10, by pid and count.
            let index = (((pid % 4096) << 8) | (n % 256)) * 4;
            let base = u32::from(Ipv4Addr::new(10, 64, 0, 0)) + index;
            let (h, d) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
            let used = |a: Ipv4Addr| {
                taken.contains(&format!(" {a} ")) || taken.contains(&format!(" {a}/"))
            };
            if !used(h) && !used(d) {
                break (n, h, d);
            }
            if n > 4096 {
                return Err("no free /30 in 10.64.0.0/10".into());
            }
        };
        let host_if = format!("fq{}h{n}", pid % 10_000_000);
        let node_if = format!("fq{}n{n}", pid % 10_000_000);
        let host = Arc::new(open_tun(&host_if)?);
        let node = Arc::new(open_tun(&node_if)?);
        let mut link = Link {
            ns: format!("{PREFIX}{pid}-{n}"),
            host_addr,
            node_addr,
            conditions: Arc::new(Mutex::new(Conditions {
                shape: Shape::none(),
                cut: false,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        // From here on, dropping `link` removes whatever was made (the
        // devices go with their files).
        run("ip", &["netns", "add", &link.ns])?;
        run("ip", &["link", "set", &node_if, "netns", &link.ns])?;
        let (h, d) = (host_addr.to_string(), node_addr.to_string());
        run("ip", &["addr", "add", &h, "peer", &d, "dev", &host_if])?;
        run("ip", &["link", "set", &host_if, "up"])?;
        link.in_ns("ip", &["addr", "add", &d, "peer", &h, "dev", &node_if])?;
        link.in_ns("ip", &["link", "set", &node_if, "up"])?;
        link.in_ns("ip", &["link", "set", "lo", "up"])?;
        link.relay(host.clone(), node.clone());
        link.relay(node, host);
        Ok(link)
    }

    /// Carries packets from `from` to `to`: a reader that drops or
    /// schedules each packet, and a writer that delivers it when due.
    fn relay(&mut self, from: Arc<File>, to: Arc<File>) {
        let flight: Flight = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
        let (stop, conditions, queue) =
            (self.stop.clone(), self.conditions.clone(), flight.clone());
        self.threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut last_due = Instant::now();
            // Which packets are lost and each one's jitter (not the
            // privacy path: no noise of a release comes from here).
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            while !stop.load(Ordering::Relaxed) {
                if !readable(&from, 50) {
                    continue;
                }
                let Ok(len) = (&*from).read(&mut buf) else {
                    continue;
                };
                let c = *conditions.lock().unwrap_or_else(|p| p.into_inner());
                if c.cut || rng.random::<f64>() * 100.0 < c.shape.loss_percent {
                    continue;
                }
                let jitter = c.shape.jitter.as_secs_f64() * (2.0 * rng.random::<f64>() - 1.0);
                let delay = (c.shape.delay.as_secs_f64() + jitter).max(0.0);
                let due = (Instant::now() + Duration::from_secs_f64(delay)).max(last_due);
                last_due = due;
                let (q, ready) = &*queue;
                q.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back((due, buf[..len].to_vec()));
                ready.notify_one();
            }
        }));
        let (stop, conditions) = (self.stop.clone(), self.conditions.clone());
        self.threads.push(std::thread::spawn(move || {
            let (q, ready) = &*flight;
            let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let wait = match q.front() {
                    Some((due, _)) if *due <= now => {
                        let (_, packet) = q.pop_front().expect("a packet");
                        if !conditions.lock().unwrap_or_else(|p| p.into_inner()).cut {
                            let _ = (&*to).write(&packet);
                        }
                        continue;
                    }
                    Some((due, _)) => (*due - now).min(Duration::from_millis(50)),
                    None => Duration::from_millis(50),
                };
                q = ready
                    .wait_timeout(q, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }));
    }

    /// Runs `program args` inside the namespace.
    fn in_ns(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.ns, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    fn set(&self, change: impl FnOnce(&mut Conditions)) {
        change(&mut self.conditions.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Sets delay, jitter and loss each way (for packets sent from now
    /// on), and heals a partition.
    pub fn shape(&self, shape: Shape) -> Result<(), String> {
        if !(0.0..=100.0).contains(&shape.loss_percent) {
            return Err(format!("loss {}% is not a percentage", shape.loss_percent));
        }
        self.set(|c| *c = Conditions { shape, cut: false });
        Ok(())
    }

    /// Cuts the link both ways: every packet is dropped from now on, those
    /// in flight too; connections stay open but nothing gets through.
    pub fn partition(&self) -> Result<(), String> {
        self.set(|c| c.cut = true);
        Ok(())
    }

    /// Ends a partition: the link carries packets again, as shaped.
    pub fn heal(&self) -> Result<(), String> {
        self.set(|c| c.cut = false);
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        delete_namespace(&self.ns);
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One node: a real `fedq-node serve` in its own namespace.
pub struct NetNode {
    /// The node's name (its certificate's DNS name).
    pub name: String,
    /// Its config, data and address, as the other e2e helpers take them.
    pub node: TestNode,
    /// The node.toml the process reads.
    pub config_path: PathBuf,
    child: Option<Child>,
    /// Its namespace and link (dropped after the process is killed).
    pub link: Link,
}

impl NetNode {
    /// Starts the process (in its namespace) and waits up to `timeout`
    /// until it answers Describe from here, through the link as shaped.
    pub async fn start(
        &mut self,
        binary: &Path,
        ca: &Path,
        probe: (&Path, &Path),
        timeout: Duration,
    ) -> Result<(), String> {
        if self.child.is_some() {
            return Err(format!("{} is already running", self.name));
        }
        let log = self.node.config.base_dir.join("stderr.log");
        let stderr = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = self
            .link
            .command(binary)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "{} exited ({status}) instead of serving: {}",
                    self.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            let ready = tokio::time::timeout(Duration::from_secs(3), async {
                let mut c = connect(&self.node, ca, probe.0, probe.1).await.ok()?;
                c.describe(fedq_proto::v1::DescribeRequest {}).await.ok()
            })
            .await;
            if let Ok(Some(_)) = ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not answer Describe within {timeout:?}: {}",
                    self.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process (if running) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NetNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A federation of [`NetNode`]s sharing one CA, coordinated from this
/// process.
pub struct NetFederation {
    /// The nodes (dropped first: processes, then namespaces).
    pub nodes: Vec<NetNode>,
    /// The federation CA.
    pub ca: Authority,
    /// The `fedq-node` binary the nodes run.
    pub binary: PathBuf,
    /// Everything on disk: certificates, stores, configs, CSVs, logs.
    pub dir: tempfile::TempDir,
}

impl NetFederation {
    /// `n` nodes named `node-0`, ... each with `rows` synthetic rows
    /// (ingested into its store here) and the CTDC schema as `cases`,
    /// each in its own namespace with its link shaped by `shape`, started with `binary`
    /// and answering.
    pub async fn start(
        n: usize,
        rows: usize,
        budget: BudgetLimits,
        shape: Shape,
        binary: &Path,
    ) -> Result<NetFederation, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ca = Authority::generate("wan test CA").map_err(|e| e.to_string())?;
        ca.pem
            .write(&dir.path().join("ca"), "ca")
            .map_err(|e| e.to_string())?;
        let mut fed = NetFederation {
            nodes: Vec::new(),
            ca,
            binary: binary.to_path_buf(),
            dir,
        };
        for i in 0..n {
            let name = format!("node-{i}");
            let link = Link::create()?;
            let node_dir = fed.dir.path().join(&name);
            std::fs::create_dir_all(&node_dir).map_err(|e| e.to_string())?;
            let csv = node_dir.join("cases.csv");
            let partner = [Partner::Ngo, Partner::Hotline, Partner::CaseManagement][i % 3];
            let file = std::fs::File::create(&csv).map_err(|e| e.to_string())?;
            synth::write_csv(partner, rows, 100 + i as u64, file).map_err(|e| e.to_string())?;
            let mut config = node_config(&fed.ca, &node_dir, &name, budget);
            config.node.listen = SocketAddr::from((link.node_addr, PORT));
            let schema = Schema::from_specs("cases", &config.datasets[0].columns)?;
            {
                let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store))
                    .map_err(|e| format!("{e:#}"))?;
                fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false)
                    .map_err(|e| format!("{e:#}"))?;
            }
            let config_path = node_dir.join("node.toml");
            let text = toml::to_string(&config).map_err(|e| e.to_string())?;
            std::fs::write(&config_path, text).map_err(|e| e.to_string())?;
            link.shape(shape)?;
            fed.nodes.push(NetNode {
                name: name.clone(),
                node: TestNode {
                    name,
                    config,
                    csv,
                    running: None,
                },
                config_path,
                child: None,
                link,
            });
        }
        for i in 0..n {
            fed.start_node(i).await?;
        }
        Ok(fed)
    }

    /// Starts node `i` (again) and waits until it answers.
    pub async fn start_node(&mut self, i: usize) -> Result<(), String> {
        let ca = self.ca_path();
        let (cert, key) = self.client_cert(Role::Analyst, "readiness-probe");
        let binary = self.binary.clone();
        self.nodes[i]
            .start(&binary, &ca, (&cert, &key), Duration::from_secs(30))
            .await
    }

    /// The CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca/ca.pem")
    }

    /// A client certificate for `name` in `role` (written once).
    pub fn client_cert(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join("clients");
        let stem = format!("{role:?}-{name}");
        if !d.join(format!("{stem}.pem")).exists() {
            self.ca.issue(role, name).unwrap().write(&d, &stem).unwrap();
        }
        (d.join(format!("{stem}.pem")), d.join(format!("{stem}.key")))
    }

    /// A coordinator `Federation` over every node as analyst `analyst`,
    /// with per-node deadline `timeout`.
    pub fn federation(&self, analyst: &str, timeout: Duration) -> Federation {
        let (cert, key) = self.client_cert(Role::Analyst, analyst);
        let config = FederationConfig {
            tls: ClientTls {
                ca: self.ca_path(),
                cert,
                key,
                crl: None,
            },
            defaults: Defaults {
                timeout_secs: timeout.as_secs_f64(),
                ..Defaults::default()
            },
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeEntry {
                    name: n.name.clone(),
                    endpoint: format!("https://{}", n.node.config.node.listen),
                })
                .collect(),
            base_dir: self.dir.path().to_path_buf(),
        };
        Federation::from_config(config).expect("federation from the lab's files")
    }

    /// What node `i`'s ledger says `analyst` has spent on `cases`, and what
    /// remains of the dataset's budget, asked over the Budget RPC (through
    /// the link as shaped: heal a partitioned node first).
    pub async fn budget(&self, i: usize, analyst: &str) -> Result<(f64, f64), String> {
        let (cert, key) = self.client_cert(Role::Analyst, analyst);
        let mut c = connect(&self.nodes[i].node, &self.ca_path(), &cert, &key)
            .await
            .map_err(|e| format!("{}: {e}", self.nodes[i].name))?;
        let b = c
            .budget(fedq_proto::v1::BudgetRequest {})
            .await
            .map_err(|e| format!("{}: {e}", self.nodes[i].name))?
            .into_inner();
        b.budgets
            .iter()
            .find(|b| b.dataset == "cases")
            .map(|b| (b.spent_by_analyst, b.remaining_for_dataset))
            .ok_or_else(|| format!("{}: no budget for cases", self.nodes[i].name))
    }
}
