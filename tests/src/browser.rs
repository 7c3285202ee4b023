//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`):
//! `chromedriver` on a free port, one session, and the few commands the console tests need —
//! open a page, type into fields, click, read the page, take a screenshot. The client is
//! these few W3C WebDriver calls over `reqwest`; the browser is the real one.

use anyhow::{Context, bail, ensure};
use base64::Engine;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52f-4a616b656e20";

/// A running chromedriver with one browser session; both stopped on drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium that accepts any certificate
    /// (`acceptInsecureCerts`: the tests' gateways use a generated CA).
    pub async fn start() -> anyhow::Result<Self> {
        let port = crate::tools::free_port()?;
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver (Debian's chromium-driver)")?;
        let base = format!("http://127.0.0.1:{port}");
        // A stuck browser fails the test instead of hanging it.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        // Made before waiting, so a driver that never answers is stopped too.
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = b.http.get(format!("{}/status", b.base)).send().await
                && r.status().is_success()
            {
                break;
            }
            ensure!(Instant::now() < deadline, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900"]
            }
        }}});
        let v = b
            .call(reqwest::Method::POST, "/session", Some(caps))
            .await?;
        b.session = v["sessionId"].as_str().context("no session id")?.to_owned();
        Ok(b)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await?.json().await?;
        if let Some(e) = v["value"]["error"].as_str() {
            bail!(
                "webdriver {path}: {e}: {}",
                v["value"]["message"].as_str().unwrap_or("")
            );
        }
        Ok(v["value"].clone())
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url` and waits for it to load.
    pub async fn open(&self, url: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &self.at("/url"),
            Some(json!({"url": url})),
        )
        .await?;
        Ok(())
    }

    /// The element the CSS `selector` finds (the first).
    async fn find(&self, selector: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                &self.at("/element"),
                Some(json!({"using": "css selector", "value": selector})),
            )
            .await
            .with_context(|| format!("finding {selector}"))?;
        // The W3C element reference is the object's one value (its key is a fixed UUID).
        let id = v[ELEMENT]
            .as_str()
            .or_else(|| v.as_object()?.values().next()?.as_str())
            .with_context(|| format!("no element id in {v}"))?;
        Ok(id.to_owned())
    }

    /// Types `text` into the field `selector`.
    pub async fn fill(&self, selector: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(selector).await?;
        self.call(
            reqwest::Method::POST,
            &self.at(&format!("/element/{e}/value")),
            Some(json!({"text": text})),
        )
        .await?;
        Ok(())
    }

    /// Clicks `selector` (a submit button's form is posted and the next page loaded).
    pub async fn click(&self, selector: &str) -> anyhow::Result<()> {
        let e = self.find(selector).await?;
        self.call(
            reqwest::Method::POST,
            &self.at(&format!("/element/{e}/click")),
            Some(json!({})),
        )
        .await?;
        Ok(())
    }

    /// The text of `selector` as shown. An element the page replaced between finding and
    /// reading it (the next page loading) is found again.
    pub async fn text(&self, selector: &str) -> anyhow::Result<String> {
        let mut tries = 0;
        loop {
            let e = self.find(selector).await?;
            let path = self.at(&format!("/element/{e}/text"));
            match self.call(reqwest::Method::GET, &path, None).await {
                Ok(v) => return Ok(v.as_str().unwrap_or("").to_owned()),
                Err(err) if tries < 20 && err.to_string().contains("stale element") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Waits (up to 10 s) until the text of `selector` contains `needle` (the next page after
    /// a click may still be loading); that text.
    pub async fn wait_for_text(&self, selector: &str, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.text(selector).await.unwrap_or_default();
            if text.contains(needle) {
                return Ok(text);
            }
            ensure!(
                Instant::now() < deadline,
                "{selector} says {text:?}, not …{needle}…"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 10 s) until the page has an element `selector` (the next page, after a
    /// click that leaves this one).
    pub async fn wait_for(&self, selector: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.find(selector).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The page's DOM as it is now.
    pub async fn source(&self) -> anyhow::Result<String> {
        let v = self
            .call(reqwest::Method::GET, &self.at("/source"), None)
            .await?;
        Ok(v.as_str().unwrap_or("").to_owned())
    }

    /// Waits (up to 10 s) until the page's URL ends with `suffix`, as after a form post
    /// that redirects; the URL it ended at otherwise.
    pub async fn wait_for_url(&self, suffix: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let url = self.url().await?;
            if url.ends_with(suffix) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "still at {url}, not …{suffix}: {}",
                self.source().await?
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The page's URL.
    pub async fn url(&self) -> anyhow::Result<String> {
        let v = self
            .call(reqwest::Method::GET, &self.at("/url"), None)
            .await?;
        Ok(v.as_str().unwrap_or("").to_owned())
    }

    /// Whether the page runs script (an XSS payload that ran would have set this).
    pub async fn script_ran(&self, marker: &str) -> anyhow::Result<bool> {
        let v = self
            .call(
                reqwest::Method::POST,
                &self.at("/execute/sync"),
                Some(json!({"script": format!("return window['{marker}'] === true;"), "args": []})),
            )
            .await?;
        Ok(v.as_bool().unwrap_or(false))
    }

    /// The value of the cookie `name` (HttpOnly ones too: the driver sees them).
    pub async fn cookie(&self, name: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::GET,
                &self.at(&format!("/cookie/{name}")),
                None,
            )
            .await?;
        Ok(v["value"].as_str().context("no such cookie")?.to_owned())
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let v = self
            .call(reqwest::Method::GET, &self.at("/screenshot"), None)
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("no screenshot")?)?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The session's browser first (chromedriver stops it), then the driver.
        if self.session.is_empty() {
            let _ = self.driver.kill();
            let _ = self.driver.wait();
            return;
        }
        let addr = self.base.trim_start_matches("http://").to_owned();
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                s,
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
                self.session
            );
            let _ = s.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
