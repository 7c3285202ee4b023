//! Real clients and the peer registry: skopeo, podman, buildah with private storage and auth
//! files, and Debian's `docker-registry` (CNCF distribution 2.8.2).

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A private containers storage + auth file for podman/buildah/skopeo.
pub struct Containers {
    pub dir: tempfile::TempDir,
}

impl Containers {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let conf = format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/graph\"\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("storage.conf"), conf)?;
        std::fs::write(dir.path().join("auth.json"), "{}")?;
        Ok(Containers { dir })
    }

    /// A command for `tool` with the private storage and auth file.
    pub fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env(
            "CONTAINERS_STORAGE_CONF",
            self.dir.path().join("storage.conf"),
        )
        .env("REGISTRY_AUTH_FILE", self.dir.path().join("auth.json"))
        .env("TMPDIR", self.dir.path())
        .stdin(Stdio::null());
        c
    }

    /// Runs a tool; fails with its output if it fails. Returns stdout.
    pub fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        run(self.cmd(tool).args(args))
    }

    /// `<tool> login --cert-dir <certs> -u <user> -p <password> <host>` (podman, skopeo,
    /// buildah); fails with the tool's output if the login fails.
    pub fn login(
        &self,
        tool: &str,
        certs: &str,
        host: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        self.run(
            tool,
            &[
                "login",
                "--cert-dir",
                certs,
                "-u",
                user,
                "-p",
                password,
                host,
            ],
        )
    }

    /// Builds an image from scratch holding `file` at `/bin/busybox`; returns its local name.
    pub fn build_scratch_image(&self, name: &str, file: &Path) -> anyhow::Result<()> {
        let ctr = self
            .run("buildah", &["from", "scratch"])?
            .trim()
            .to_string();
        self.run(
            "buildah",
            &["copy", &ctr, &file.display().to_string(), "/bin/busybox"],
        )?;
        self.run("buildah", &["config", "--cmd", "/bin/busybox", &ctr])?;
        self.run("buildah", &["commit", "-q", &ctr, name])?;
        self.run("buildah", &["rm", &ctr])?;
        Ok(())
    }
}

/// Runs a command, returning stdout or an error with both outputs.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every regular file of a directory, relative path → content (for byte-identical checks).
pub fn dir_files(dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path())?,
            );
        }
    }
    Ok(out)
}

/// A running `docker-registry` (distribution 2.8.2) on a free port, killed on drop.
pub struct Distribution {
    child: Child,
    pub base: String,
    pub addr: String,
    _config: tempfile::TempDir,
}

impl Distribution {
    pub fn start(root: &Path) -> anyhow::Result<Self> {
        Self::start_with(root, None, None)
    }

    /// With Basic auth from `users` (name, password) when given, and its log (access log
    /// lines, one per request) written to `log`.
    pub fn start_with(
        root: &Path,
        users: Option<&[(&str, &str)]>,
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = tempfile::tempdir()?;
        let path = Self::write_config(config.path(), root, &addr)?;
        let mut yaml = std::fs::read_to_string(&path)?;
        if let Some(users) = users {
            let file = config.path().join("htpasswd");
            let mut lines = String::new();
            for (u, p) in users {
                lines.push_str(&format!("{u}:{}\n", bcrypt::hash(p, 5)?));
            }
            std::fs::write(&file, lines)?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: upstream\n    path: {}\n",
                file.display()
            ));
        }
        if log.is_some() {
            yaml = yaml.replace("level: error", "level: info");
        }
        std::fs::write(&path, yaml)?;
        // Its access log goes to stdout, the rest to stderr.
        let output = match log {
            Some(f) => {
                let file = std::fs::File::create(f)?;
                (Stdio::from(file.try_clone()?), Stdio::from(file))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        // `/v2/` answers 401 with auth: only the port is waited for then.
        Self::serve(config, &path, addr, output, users.is_none())
    }

    /// Runs `serve` on the config file `path` (in `config`) listening on `addr`, its stdout
    /// and stderr to `output`; waits until it listens (and, when `open`, answers `/v2/`).
    fn serve(
        config: tempfile::TempDir,
        path: &Path,
        addr: String,
        output: (Stdio, Stdio),
        open: bool,
    ) -> anyhow::Result<Self> {
        let child = Self::command(
            &distribution_binary(),
            &["serve", &path.display().to_string()],
        )
        .stdin(Stdio::null())
        .stdout(output.0)
        .stderr(output.1)
        .spawn()
        .context("starting docker-registry")?;
        let base = format!("http://{addr}");
        let d = Distribution {
            child,
            base: base.clone(),
            addr,
            _config: config,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(&d.addr).is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "docker-registry never listened on {}",
                d.addr
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if open {
            crate::server::wait_healthy(&format!("{base}/v2/"))?;
        }
        Ok(d)
    }

    /// On an S3 bucket (moto at `endpoint`, any credentials) under `prefix`: distribution's
    /// S3 driver, path-style since an endpoint is set.
    pub fn start_on_s3(endpoint: &str, bucket: &str, prefix: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = tempfile::tempdir()?;
        let path = config.path().join("config.yml");
        std::fs::write(
            &path,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  s3:\n    accesskey: test\n    secretkey: test\n    region: us-east-1\n    regionendpoint: {endpoint}\n    bucket: {bucket}\n    rootdirectory: /{prefix}\n    secure: false\n    v4auth: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n"
            ),
        )?;
        Self::serve(config, &path, addr, (Stdio::null(), Stdio::null()), true)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client of it signing in as `user` (name, password) with Basic auth.
    pub fn basic_client(&self, user: (&str, &str)) -> crate::client::Client {
        use base64::Engine;
        let mut c = crate::client::Client::new(&self.base);
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", user.0, user.1));
        c.headers
            .push(("authorization".into(), format!("Basic {basic}")));
        c
    }

    /// Writes `<dir>/config.yml`: the filesystem store at `root`, deletes enabled, upload
    /// purging off, listening on `addr`.
    pub fn write_config(dir: &Path, root: &Path, addr: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join("config.yml");
        std::fs::write(
            &path,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n",
                root.display()
            ),
        )?;
        Ok(path)
    }

    /// `program args…` (distribution, or a wrapper of it such as `/usr/bin/time`) in a clean
    /// environment: distribution reads every REGISTRY_* variable as an override.
    pub fn command(program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args).env_clear().env("PATH", "/usr/bin:/bin");
        c
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn distribution_binary() -> PathBuf {
    PathBuf::from("/usr/bin/docker-registry")
}

/// A free loopback port (for programs that cannot bind port 0 and report it).
///
/// Chosen below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768–60999 on
/// Debian), so that a server another test binds to port 0 meanwhile — the kernel picks those
/// from the ephemeral range — cannot take it before its program binds it; and never the same
/// twice in one test process.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    let mut given = GIVEN.lock().expect("port registry");
    // Start anywhere (test binaries run one after another, each with its own registry).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as usize
        ^ std::process::id() as usize;
    let span = usize::from(to - from);
    for i in 0..span {
        let port = from + ((seed + i * 7919) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free port between {from} and {to}")
}

/// Debian's `nginx` serving the files of a directory over TLS (HTTP/2 by ALPN and HTTP/1.1)
/// on a free port, with default-like settings: the reference for serving a file.
/// Stopped with SIGTERM on drop (its workers go with the master).
pub struct Nginx {
    child: Child,
    /// `https://127.0.0.1:<port>`
    pub base: String,
}

impl Nginx {
    /// Serves `root` from `dir` (config, pid and logs), with the certificate and key files.
    pub fn start(dir: &Path, root: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = free_port()?;
        // Run as root, workers included, when we are root: the files are ours, mode 0700.
        let user = if std::fs::metadata("/proc/self")?.uid() == 0 {
            "user root;\n"
        } else {
            ""
        };
        let d = dir.display();
        let config = format!(
            "{user}daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  default_type application/octet-stream;\n\
             client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
             server {{\n    listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {cert};\n\
             ssl_certificate_key {key};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    root {root};\n  }}\n}}\n",
            cert = cert.display(),
            key = key.display(),
            root = root.display(),
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx (apt-get install nginx)")?;
        let mut n = Nginx {
            child,
            base: format!("https://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = n.child.try_wait()? {
                anyhow::bail!("nginx exited ({status}); see {d}/error.log");
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "nginx never listened on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(n)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// `<ctr dir>/certs/ca.crt` holding `ca_pem`, for `--cert-dir` of podman, skopeo and buildah.
pub fn cert_dir(ctr: &Containers, ca_pem: &[u8]) -> anyhow::Result<String> {
    let d = ctr.dir.path().join("certs");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("ca.crt"), ca_pem)?;
    Ok(d.display().to_string())
}

/// A registry's CA in /etc/docker/certs.d/<host:port>/ca.crt, where the docker CLI and
/// dockerd look for it; removed on drop.
pub struct DockerTrust(PathBuf);

impl DockerTrust {
    pub fn install(host: &str, ca_pem: &[u8]) -> anyhow::Result<Self> {
        let certs = Path::new("/etc/docker/certs.d").join(host);
        std::fs::create_dir_all(&certs)?;
        std::fs::write(certs.join("ca.crt"), ca_pem)?;
        Ok(DockerTrust(certs))
    }
}

impl Drop for DockerTrust {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `docker --config <config> login <host> -u <user> --password-stdin`: whether it succeeded
/// and what it printed.
pub fn docker_login(
    config: &Path,
    host: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<(bool, String)> {
    use std::io::Write;
    let mut c = Command::new("docker")
        .arg("--config")
        .arg(config)
        .args(["login", host, "-u", user, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running docker login")?;
    c.stdin
        .take()
        .context("no stdin")?
        .write_all(password.as_bytes())?;
    let out = c.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok((
        out.status.success() && text.contains("Login Succeeded"),
        text,
    ))
}

/// A private dockerd (Debian's docker.io), stopped on drop.
pub struct Dockerd {
    child: std::process::Child,
    pub dir: tempfile::TempDir,
}

impl Dockerd {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// With more daemon arguments (e.g. `--registry-mirror <url>`).
    pub fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().display().to_string();
        let child = std::process::Command::new("dockerd")
            .args(extra)
            .args([
                "--data-root",
                &format!("{d}/data"),
                "--exec-root",
                &format!("{d}/exec"),
                "-H",
                &format!("unix://{d}/docker.sock"),
                "--pidfile",
                &format!("{d}/pid"),
                "--storage-driver",
                "overlay2",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log"))?)
            .spawn()?;
        let dk = Dockerd { child, dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !dk
            .docker(&["version"])
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "dockerd did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(dk)
    }

    /// The docker CLI talking to this daemon, its config in [`Dockerd::client_config`].
    pub fn cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new("docker");
        c.env(
            "DOCKER_HOST",
            format!("unix://{}/docker.sock", self.dir.path().display()),
        )
        .env("DOCKER_CONFIG", self.client_config())
        .env("DOCKER_BUILDKIT", "0")
        .stdin(std::process::Stdio::null());
        c
    }

    /// The CLI's `DOCKER_CONFIG` directory.
    pub fn client_config(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    fn docker(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        self.cmd().args(args).output()
    }

    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        Self::output(args, self.docker(args)?)
    }

    /// `cmd` (a [`Dockerd::cmd`] with more set) run to success; its output.
    pub fn run_cmd(&self, cmd: &mut std::process::Command) -> anyhow::Result<String> {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::output(&args, cmd.output()?)
    }

    fn output(args: &[&str], out: std::process::Output) -> anyhow::Result<String> {
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "docker {args:?} failed:\n{text}");
        Ok(text)
    }

    /// Builds `tag` from scratch with busybox and nothing else; the image id.
    pub fn build_busybox(&self, tag: &str) -> anyhow::Result<String> {
        let ctx = tempfile::tempdir()?;
        std::fs::copy("/bin/busybox", ctx.path().join("busybox"))?;
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\"]\n",
        )?;
        self.run(&["build", "-q", "-t", tag, &ctx.path().display().to_string()])?;
        Ok(self
            .run(&["image", "inspect", "--format", "{{.Id}}", tag])?
            .trim()
            .to_string())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
