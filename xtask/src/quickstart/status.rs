//! `stop` (everything recorded, newest first; `--purge` also the data) and
//! `status` (what runs, with a health check each; exit status 0 all
//! healthy, 1 something is not, 3 nothing runs).

use super::config::Config;
use super::{COMPONENTS, Comp, Ctx};
use crate::{procs, ui};
use anyhow::Result;

pub(super) async fn stop(ctx: &Ctx, purge: bool) -> Result<i32> {
    let mut any = false;
    for comp in COMPONENTS.iter().rev() {
        if ctx.state.has_record(comp.name()) {
            any = true;
            procs::stop(&ctx.state, comp.name(), ctx.stop_timeout).await?;
        }
    }
    if !any {
        ui::log(format!(
            "nothing to stop (no PID files in {}/pids)",
            ctx.state.path().display()
        ));
    }
    let _ = std::fs::remove_file(&ctx.state_file);
    if purge {
        for data in ["mongo-data", "redis-data"] {
            let _ = std::fs::remove_dir_all(ctx.state.path().join(data));
        }
        ui::log(format!(
            "deleted {}/mongo-data and redis-data",
            ctx.state.path().display()
        ));
    }
    ui::log(format!(
        "stopped (logs kept in {}/)",
        ctx.log_dir().display()
    ));
    Ok(0)
}

pub(super) async fn status(ctx: &Ctx) -> Result<i32> {
    if !ctx.state_file.is_file() && !ctx.any_running() {
        ui::log("not running (./quickstart.sh start)");
        for comp in COMPONENTS {
            if ctx.state.has_record(comp.name()) {
                ui::say(format!(
                    "stale PID file: {}",
                    ctx.state.pid_path(comp.name()).display()
                ));
            }
        }
        return Ok(3);
    }
    let config = Config::read(&ctx.state_file).ok();
    let profile = config.as_ref().map_or("?", |c| c.profile.as_str());
    ui::log(format!(
        "quickstart in {} (profile {profile})",
        ctx.state.path().display()
    ));
    let mut ok = true;
    for comp in COMPONENTS {
        if let Some(config) = &config
            && !config.wanted(comp)
        {
            let url = if comp == Comp::Redis {
                &config.redis_url
            } else {
                &config.mongo_uri
            };
            ui::say(format!("{:<12} external: {url}", comp.name()));
            continue;
        }
        let Some(record) = ctx.state.running(comp.name()) else {
            let stale = if ctx.state.has_record(comp.name()) {
                " (stale PID file)"
            } else {
                ""
            };
            ui::say(format!("{:<12} NOT running{stale}", comp.name()));
            ok = false;
            continue;
        };
        let port = config.as_ref().and_then(|c| c.port(comp)).or(record.port);
        let (shown, health) = match port {
            Some(port) => {
                let (probe, shown) = comp.health(port);
                let healthy = probe.probe().await.is_ok();
                (shown, if healthy { "healthy" } else { "NOT healthy" })
            }
            None => ("port unknown".to_owned(), "NOT healthy"),
        };
        ok &= health == "healthy";
        ui::say(format!(
            "{:<12} running  pid {:<7} {shown:<40} {health}",
            comp.name(),
            record.pid
        ));
    }
    if ok {
        Ok(0)
    } else {
        ui::say(
            "('./quickstart.sh start' starts what is missing; './quickstart.sh stop' stops the rest)",
        );
        Ok(1)
    }
}
