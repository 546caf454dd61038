"""The system under test as the phases address it: the customer ids that
`cachectl populate` writes, the API's routes and Redis keys for them, and
clients of the test bed's Redis and MongoDB.

redis and pymongo are imported when a client is made: they come from
bench/.venv, and subcommands without them (and --help) also run elsewhere.
"""

from __future__ import annotations

import json

from .http import Http


def customer_id(n: int) -> str:
    return f"CUST{n:05d}"


def customer_ids(count: int) -> list[str]:
    """CUST00001 .. the count-th id, as populated."""
    return [customer_id(n) for n in range(1, count + 1)]


def feature_path(customer: str) -> str:
    """The API's single-document route."""
    return f"/api/features/{customer}/"


def redis_key(customer: str) -> str:
    """Where the services cache a customer's document in Redis."""
    return f"features:{customer}"


def batch_read(client: Http, ids: list[str]) -> dict:
    """POST /api/features/batch/: {"found": [...], "missing": [...]}."""
    status, _, body = client.post_json("/api/features/batch/", {"customer_ids": ids})
    if status != 200:
        raise RuntimeError(f"batch read answered {status}: {body[:200]!r}")
    return json.loads(body)


def near_cache_entries(client: Http):
    """Entries in the API's near cache (its first tier in /api/info/); None when info fails."""
    status, _, body = client.get("/api/info/")
    return json.loads(body)["tiers"][0].get("entries") if status == 200 else None


def redis_client(port: int):
    import redis

    return redis.Redis(host="127.0.0.1", port=port)


def mongo_client(args, **options):
    """A MongoClient for --mongo-uri, with pymongo options."""
    import pymongo

    return pymongo.MongoClient(args.mongo_uri, **options)


def features_collection(client, args):
    """The documents' collection, --mongo-db / --mongo-collection."""
    return client[args.mongo_db][args.mongo_collection]
