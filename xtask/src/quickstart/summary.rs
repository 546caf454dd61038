//! What a finished start prints: where everything is and what to try.

use super::config::Config;
use super::{Comp, Ctx};

/// Where everything is, and what to try.
pub(super) fn print(ctx: &Ctx, config: &Config) {
    let port = |c: Comp| {
        config
            .port(c)
            .map_or_else(|| "?".to_owned(), |p| p.to_string())
    };
    let a1 = format!("http://127.0.0.1:{}", port(Comp::Api1));
    let a2 = format!("http://127.0.0.1:{}", port(Comp::Api2));
    let inv = format!("http://127.0.0.1:{}", port(Comp::Invalidator));
    let whose = |own: bool, what: &str| {
        if own {
            format!("  (quickstart's {what})")
        } else {
            "  (yours)".to_owned()
        }
    };
    let state_file = ctx.state_file.display();
    let bin = config.bin_dir.display();
    let logs = ctx.log_dir();
    println!(
            "
==> redis-mongo-cache is running
    API replicas   {a1}  (api-1)   {a2}  (api-2)
    Swagger UI     {a1}/swagger/
    ReDoc          {a1}/redoc/
    health         {a1}/api/health/
    info           {a1}/api/info/
    metrics        {a1}/metrics
    invalidator    {inv}/health   {inv}/metrics
    REDIS_URL      {}{}
    MONGO_URI      {}{}
    MONGO_DB       {}
    logs           {}/
    environment    set -a; . {state_file}; set +a    (then e.g. {bin}/cachectl populate --count 100)

    try:
      curl -s -X POST {a1}/api/features/ -H 'content-type: application/json' \\
           -d '{{\"customer_id\": \"CUST00001\", \"features\": {{\"credit_score\": 720, \"segment\": \"gold\"}}}}'
      curl -s {a1}/api/features/CUST00001/     # \"source\" names the tier that answered
      curl -s {a2}/api/features/CUST00001/     # the other replica
      curl -s {a1}/api/health/
      ./quickstart.sh status

    stop:  ./quickstart.sh stop",
            config.redis_url,
            whose(config.own_redis, "redis-server"),
            config.mongo_uri,
            whose(config.own_mongo, "SecantusDB"),
            config.mongo_db,
            logs.display(),
        );
}
