//! The running system's settings: resolved from the environment (and
//! `.env`) at the first start, kept in the state file (`DIR/env`, sourceable)
//! while anything runs, so a second start or a status sees the same.

use super::{COMPONENTS, Comp};
use crate::envfile::{Env, parse, quote};
use crate::{paths, ui};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use testkit::process::{free_ports, port_busy};

pub(super) struct Config {
    pub own_redis: bool,
    pub own_mongo: bool,
    pub redis_url: String,
    pub mongo_uri: String,
    pub mongo_db: String,
    /// By component, in [`COMPONENTS`] order; `None` for an external one.
    pub ports: [Option<u16>; 5],
    pub profile: String,
    pub bin_dir: PathBuf,
}

fn index(comp: Comp) -> usize {
    // the enum's order is COMPONENTS' order
    comp as usize
}

impl Config {
    /// A new system's settings (ports not chosen yet): our own Redis and
    /// MongoDB unless `REDIS_URL` / `MONGO_URI` name others.
    pub fn new(env: &Env, bin_dir: Option<PathBuf>) -> Result<Self> {
        let profile = env
            .get("QUICKSTART_PROFILE")
            .unwrap_or_else(|| "release".to_owned());
        if profile != "release" && profile != "debug" {
            bail!("QUICKSTART_PROFILE={profile}: want release or debug");
        }
        let bin_dir = match bin_dir {
            Some(dir) => {
                std::path::absolute(&dir).with_context(|| format!("--bin-dir {}", dir.display()))?
            }
            None => paths::target_dir().join(&profile),
        };
        let redis_url = env.get("REDIS_URL");
        let mongo_uri = env.get("MONGO_URI");
        Ok(Self {
            own_redis: redis_url.is_none(),
            own_mongo: mongo_uri.is_none(),
            redis_url: redis_url.unwrap_or_default(),
            mongo_uri: mongo_uri.unwrap_or_default(),
            mongo_db: env
                .get("MONGO_DB")
                .unwrap_or_else(|| "cache_demo".to_owned()),
            ports: [None; 5],
            profile,
            bin_dir,
        })
    }

    pub fn port(&self, comp: Comp) -> Option<u16> {
        self.ports[index(comp)]
    }

    /// Whether this configuration runs `comp` (not an external Redis/MongoDB).
    pub fn wanted(&self, comp: Comp) -> bool {
        match comp {
            Comp::Redis => self.own_redis,
            Comp::Mongo => self.own_mongo,
            _ => true,
        }
    }

    /// Ports for what this configuration runs (see `--help`): a port you
    /// chose must be free; a busy default is replaced by a free port.
    pub fn choose_ports(&mut self, env: &Env) -> Result<()> {
        let mut chosen: Vec<u16> = Vec::new();
        for comp in COMPONENTS {
            if !self.wanted(comp) {
                continue;
            }
            let var = comp.port_var();
            let label = comp.label();
            let port = match env.get(var) {
                Some(given) => {
                    let port: u16 = match given.parse() {
                        Ok(p) if p > 0 => p,
                        _ => bail!("{var}={given} is not a port"),
                    };
                    if chosen.contains(&port) {
                        bail!("{var}={given}: that port is already used for another service");
                    }
                    if port_busy(port) {
                        bail!("port {port} ({var}, for {label}) is busy; choose another one");
                    }
                    port
                }
                None => {
                    let default = comp.default_port();
                    if port_busy(default) || chosen.contains(&default) {
                        let port = free_ports(20)?
                            .into_iter()
                            .find(|p| !chosen.contains(p))
                            .context("no free port found")?;
                        ui::log(format!(
                            "port {default} ({label}) is busy: using {port} instead (set {var} to choose)"
                        ));
                        port
                    } else {
                        default
                    }
                }
            };
            chosen.push(port);
            self.ports[index(comp)] = Some(port);
        }
        if let Some(port) = self.port(Comp::Redis) {
            self.redis_url = format!("redis://127.0.0.1:{port}/0");
        }
        if let Some(port) = self.port(Comp::Mongo) {
            self.mongo_uri = testkit::secantus::uri(port);
        }
        Ok(())
    }

    /// Writes the state file (atomically).
    pub fn write(&self, file: &Path) -> Result<()> {
        let flag = |b: bool| if b { "1" } else { "0" };
        let mut text = String::from(
            "# written by quickstart; source it (set -a) to talk to the running system\n",
        );
        text.push_str(&format!("REDIS_URL={}\n", quote(&self.redis_url)));
        text.push_str(&format!("MONGO_URI={}\n", quote(&self.mongo_uri)));
        text.push_str(&format!("MONGO_DB={}\n", quote(&self.mongo_db)));
        text.push_str(&format!("QS_OWN_REDIS={}\n", flag(self.own_redis)));
        text.push_str(&format!("QS_OWN_MONGO={}\n", flag(self.own_mongo)));
        for comp in COMPONENTS {
            let port = self.port(comp).map_or_else(String::new, |p| p.to_string());
            text.push_str(&format!("{}={port}\n", comp.port_var()));
        }
        text.push_str(&format!("QUICKSTART_PROFILE={}\n", self.profile));
        text.push_str(&format!(
            "QS_BIN_DIR={}\n",
            quote(&self.bin_dir.display().to_string())
        ));
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, file))
            .with_context(|| format!("cannot write {}", file.display()))
    }

    /// Reads the state file.
    pub fn read(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let mut env = Env::default();
        for (key, value) in parse(&text) {
            env.set(&key, value);
        }
        let mut ports = [None; 5];
        for (i, comp) in COMPONENTS.iter().enumerate() {
            ports[i] = env.get(comp.port_var()).and_then(|p| p.parse().ok());
        }
        Ok(Self {
            own_redis: env.get("QS_OWN_REDIS").as_deref() != Some("0"),
            own_mongo: env.get("QS_OWN_MONGO").as_deref() != Some("0"),
            redis_url: env.get("REDIS_URL").unwrap_or_default(),
            mongo_uri: env.get("MONGO_URI").unwrap_or_default(),
            mongo_db: env
                .get("MONGO_DB")
                .unwrap_or_else(|| "cache_demo".to_owned()),
            ports,
            profile: env
                .get("QUICKSTART_PROFILE")
                .unwrap_or_else(|| "release".to_owned()),
            bin_dir: env
                .get("QS_BIN_DIR")
                .map_or_else(|| paths::target_dir().join("release"), PathBuf::from),
        })
    }
}
