"""Redis URLs: single servers and Sentinel-managed primaries, lorafleet's own parameters
(wait_replicas, wait_timeout_ms, sentinel_password), and what never reaches a log."""

from __future__ import annotations

import pytest
import redis
from lf_testkit import wait_until

from lorafleet.common.redis.connection import connect
from lorafleet.common.redis.replication import ReplicatedRedis
from lorafleet.common.redis.url import kombu_broker, parse_redis_url
from lorafleet.common.settings import redacted


@pytest.fixture(scope="session")
def redis_url(plain_redis_url: str) -> str:
    """One server (also under LORAFLEET_TEST_REDIS=sentinel): these tests are about it."""
    return plain_redis_url

def test_a_sentinel_url_names_its_sentinels_master_db_and_waits_for_one_replica_by_default():
    t = parse_redis_url("redis+sentinel://:p%40ss@s1:26379,s2,[::1]:26380/lorafleet/3?sentinel_password=sp")
    assert t.is_sentinel
    assert t.sentinels == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert (t.master, t.db, t.password, t.sentinel_password) == ("lorafleet", 3, "p@ss", "sp")
    assert (t.wait_replicas, t.wait_timeout_ms) == (1, 1000)
    assert parse_redis_url("redis+sentinel://s1/m?wait_replicas=0").wait_replicas == 0


def test_urls_keep_their_shape_for_redis_py_and_kombu():
    assert parse_redis_url("unix:///tmp/r.sock?db=2&wait_replicas=1").url == "unix:///tmp/r.sock?db=2"
    assert parse_redis_url("redis://h:1/0?wait_replicas=1#x").url == "redis://h:1/0#x"
    broker, _ = kombu_broker(parse_redis_url("redis+sentinel://[::1]:26379,h:1/m/2"))
    assert broker == "sentinel://[::1]:26379/2;sentinel://h:1/2"


def test_a_wait_longer_than_the_socket_timeout_is_refused():
    """It would time out client-side, and redis-py would send the write again."""
    with pytest.raises(ValueError, match="wait_timeout_ms=3000 must be below the socket timeout"):
        connect("redis://127.0.0.1:1/0?wait_replicas=1&wait_timeout_ms=3000", socket_timeout_s=2)


def test_where_command_is_refused_every_command_waits(tmp_path):
    """A managed Redis may rename or block COMMAND: then lorafleet cannot tell reads from writes
    and takes every command as a write (correct; reads then need a replica too)."""
    import subprocess

    from lorafleet.common.redis.connection import free_port, redis_server_binary
    from lorafleet.common.redis.replication import ReplicationShortfall

    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path), "--rename-command", "COMMAND", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        plain = connect(url)
        def up() -> bool:
            try:
                return bool(plain.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, timeout_s=20, what="the server")
        strict = connect(f"{url}?wait_replicas=1&wait_timeout_ms=50")
        with pytest.raises(ReplicationShortfall, match="GET"):
            strict.get("k")
        assert plain.get("k") is None  # without wait_replicas nothing changes
    finally:
        proc.kill()
        proc.wait()


def test_a_single_server_waits_for_no_replica_unless_asked_and_keeps_its_own_parameters():
    t = parse_redis_url("redis://:pw@h:6379/0")
    assert not t.is_sentinel and t.wait_replicas == 0 and t.url == "redis://:pw@h:6379/0"
    t = parse_redis_url("rediss://h:6380/1?ssl_cert_reqs=required&wait_replicas=2&wait_timeout_ms=250")
    assert (t.wait_replicas, t.wait_timeout_ms) == (2, 250)
    assert t.url == "rediss://h:6380/1?ssl_cert_reqs=required"  # redis-py never sees ours


@pytest.mark.parametrize(("url", "message"), [
    ("redis+sentinel://s1:26379", "ends with /<master name>"),
    ("redis+sentinel://s1:26379/m/0/x", "ends with /<master name>"),
    ("redis+sentinel://s1:26379/m/zero", "database 'zero' is not a number"),
    ("redis+sentinel://s1:x/m", "the port is not a number"),
    ("redis+sentinel://s1,,s2/m", "empty entry"),
    ("redis://h/0?wait_replicas=many", "wait_replicas='many' is not an integer"),
    ("redis://h/0?wait_replicas=-1", "wait_replicas must be >= 0"),
    ("redis://h/0?wait_timeout_ms=0", "wait_timeout_ms must be >= 1"),
])
def test_a_url_lorafleet_cannot_use_says_what_to_fix(url, message):
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)
    with pytest.raises(ValueError, match=message):
        connect(url)


def test_no_password_of_a_sentinel_url_reaches_a_log_line():
    url = "redis+sentinel://user:s3cr3t@s1:26379,s2:26379/lorafleet/0?sentinel_password=t0p&wait_replicas=1"
    shown = redacted(url)
    assert "s3cr3t" not in shown and "t0p" not in shown
    assert shown.startswith("redis+sentinel://user:***@s1:26379,s2:26379/lorafleet/0")
    assert "wait_replicas=1" in shown  # the rest stays readable


def test_connect_to_one_server_without_wait_is_a_plain_client(redis_url):
    r = connect(redis_url)
    assert isinstance(r, ReplicatedRedis) and r.wait_replicas == 0
    assert r.set("lf:test:plain", 1) and r.pipeline().set("lf:test:plain", 2).execute() == [True]
    # asked to wait for a replica this server does not have: a write is never reported done
    from lorafleet.common.redis.replication import ReplicationShortfall
    sep = "&" if "?" in redis_url else "?"
    strict = connect(f"{redis_url}{sep}wait_replicas=1&wait_timeout_ms=50")
    with pytest.raises(ReplicationShortfall, match="0 of 1 replica"):
        strict.set("lf:test:plain", 3)
    assert strict.get("lf:test:plain") == "3"  # it reached the primary; it is just not confirmed
    assert strict.pipeline(transaction=False).get("lf:test:plain").execute() == ["3"]  # reads never wait
    with pytest.raises(ReplicationShortfall, match="pipeline of 2"):
        strict.pipeline(transaction=False).get("lf:test:plain").incr("lf:test:n").execute()
    with pytest.raises(ReplicationShortfall, match="transaction"):
        strict.pipeline().incr("lf:test:n").execute()
    r.delete("lf:test:plain", "lf:test:n")


def test_readyz_and_fleet_status_say_when_writes_wait_for_a_missing_replica(redis_url, tmp_path):
    """wait_replicas=1 on a server without a replica: every write would raise, so /readyz is 503
    naming the cause and `lorafleet fleet`'s line says writes are held; without it, both are fine."""
    from fastapi.testclient import TestClient

    from lorafleet.common.settings import Settings
    from lorafleet.scheduler.api.app import create_app
    from lorafleet.scheduler.fleet_status import read_fleet_status

    sep = "&" if "?" in redis_url else "?"
    for url, ready, held in ((redis_url, 200, False), (f"{redis_url}{sep}wait_replicas=1", 503, True)):
        r = connect(url)
        settings = Settings(redis_url=url, cache_dir=tmp_path, store_url=str(tmp_path / "store"))
        with TestClient(create_app(settings, r)) as c:
            res = c.get("/readyz")
        assert res.status_code == ready, res.text
        if held:
            assert "0 replica(s) online, writes wait for 1" in res.json()["error"]["message"]
        status = read_fleet_status(r)
        assert status.redis["replicas"] == 0 and status.redis["ok"] is not held
        assert ("WRITES HELD" in status.line()) is held
