"""Closed swarms: key files, allowlists, and the trainer's CURVE ROUTER over real ZeroMQ."""

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq

from swarmrl.base.config import Config, SwarmConfig
from swarmrl.base.recipes import load_config
from swarmrl.cli.launch import close_swarm, worker_command
from swarmrl.protocol import messages as m
from swarmrl.protocol.auth import (
    CurveClient,
    KeyFileError,
    KeyPair,
    load_curve_client,
    load_key_pair,
    load_public_key,
    new_key_pair,
    read_allowlist,
)
from swarmrl.protocol.transport import Channel, make_dealer
from swarmrl.trainer.leases import LeaseBook
from swarmrl.trainer.server import SwarmServer

HELLO = m.Hello(worker_name="w", backend="hf", software_version="test", max_prompts_per_lease=1)


def test_key_pair_round_trip(tmp_path: Path) -> None:
    public_file, secret_file = new_key_pair(tmp_path / "keys", "alice")
    pair = load_key_pair(secret_file)
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert zmq.curve_public(pair.secret) == pair.public
    assert load_public_key(str(public_file)) == pair.public
    assert load_public_key(str(secret_file)) == pair.public
    assert load_public_key(pair.public.decode()) == pair.public
    assert load_key_pair(new_key_pair(tmp_path / "keys", "bob")[1]) != pair


def test_new_key_pair_never_overwrites(tmp_path: Path) -> None:
    _, secret_file = new_key_pair(tmp_path, "alice")
    before = secret_file.read_bytes()
    with pytest.raises(KeyFileError, match=re.escape(f"{tmp_path / 'alice.key'}: already exists")):
        new_key_pair(tmp_path, "alice")
    assert secret_file.read_bytes() == before
    with pytest.raises(KeyFileError, match=re.escape("key name")):
        new_key_pair(tmp_path, "../elsewhere")


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    public_file, secret_file = new_key_pair(tmp_path, "alice")
    missing = tmp_path / "missing.key_secret"
    with pytest.raises(KeyFileError, match=re.escape(f"{missing}: key file not found")):
        load_key_pair(missing)
    with pytest.raises(KeyFileError, match=re.escape(f"{public_file}: holds only a public key")):
        load_key_pair(public_file)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\xff not a certificate\n")
    with pytest.raises(KeyFileError, match=re.escape(f"{garbage}: not a key file")):
        load_key_pair(garbage)
    text = secret_file.read_text()
    secret = load_key_pair(secret_file).secret.decode()
    bad = tmp_path / "bad.key_secret"
    bad.write_text(text.replace(secret, secret[:-3]))
    with pytest.raises(KeyFileError, match=re.escape(f"{bad}: malformed secret key")):
        load_key_pair(bad)
    other_public = zmq.curve_keypair()[0].decode()
    swapped = tmp_path / "swapped.key_secret"
    swapped.write_text(text.replace(load_key_pair(secret_file).public.decode(), other_public))
    with pytest.raises(KeyFileError, match=re.escape(f"{swapped}: the public key does not belong")):
        load_key_pair(swapped)
    with pytest.raises(KeyFileError, match=re.escape("nope: neither a public key")):
        load_public_key("nope")


def test_allowlist_skips_comments_and_names_a_bad_line(tmp_path: Path) -> None:
    keys = [zmq.curve_keypair()[0] for _ in range(3)]
    allow = tmp_path / "allowed.txt"
    allow.write_text(
        f"# workers of the lab\n\n{keys[0].decode()}\n"
        f"  {keys[1].decode()}   # alice's laptop\n#{keys[2].decode()}\n"
    )
    assert read_allowlist(allow) == {keys[0], keys[1]}
    allow.write_text(f"{keys[0].decode()}\n{keys[1].decode()} {keys[2].decode()}\n")
    with pytest.raises(KeyFileError, match=re.escape(f"{allow}, line 2: not a public key")):
        read_allowlist(allow)
    with pytest.raises(KeyFileError, match=re.escape(f"{tmp_path / 'none.txt'}: cannot read")):
        read_allowlist(tmp_path / "none.txt")


def test_recipe_key_paths_are_relative_to_the_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "closed.toml"
    recipe.write_text('[swarm]\nallow_keys = "keys/allowed.txt"\ntrainer_key = "t.key_secret"\n')
    swarm = load_config(str(recipe)).swarm
    assert swarm.allow_keys == str(tmp_path / "keys" / "allowed.txt")
    assert swarm.trainer_key == str(tmp_path / "t.key_secret")
    overridden = load_config(str(recipe), ["--swarm.allow_keys", "here.txt"]).swarm
    assert overridden.allow_keys == "here.txt"  # the command line is relative to the cwd


# ---- the trainer's ROUTER over real ZeroMQ ------------------------------------------------


@pytest.fixture
def closed_swarm(tmp_path: Path, model_path: str):
    """A started SwarmServer on loopback that accepts only `allowed`'s key (and its own)."""
    from swarmrl.base.models import load_tokenizer

    _, trainer_secret = new_key_pair(tmp_path, "trainer")
    _, allowed_secret = new_key_pair(tmp_path, "allowed")
    allow = tmp_path / "allowed.txt"
    allow.write_text(f"# one worker\n{load_key_pair(allowed_secret).public.decode()}\n")
    swarm = SwarmConfig(allow_keys=str(allow), trainer_key=str(trainer_secret))
    server = SwarmServer(
        Config(swarm=swarm),
        tokenizer=load_tokenizer(model_path),
        tasks=None,
        reward_functions=[],
        leases=LeaseBook(seed=0, lease_timeout_s=60.0),
        weights=SimpleNamespace(version=0),
        run_id="auth-test",
    )
    server.start()
    trainer = load_key_pair(trainer_secret)
    yield SimpleNamespace(
        server=server,
        allowed=CurveClient(load_key_pair(allowed_secret), trainer.public),
        trainer=trainer,
    )
    server.stop()


def answer_to_hello(endpoint: str, curve: CurveClient | None, timeout_s: float) -> object:
    """What the trainer sends back to a hello from a fresh worker socket, or None."""
    context = zmq.Context()
    channel = Channel(make_dealer(context, endpoint, b"w" + os.urandom(8), 2**20, curve))
    try:
        channel.send(HELLO, timeout_s=timeout_s)
        received = channel.recv(timeout_s=timeout_s)
        return None if received is None else received[0]
    except TimeoutError:  # a refused handshake never opens the connection
        return None
    finally:
        channel.close()
        context.term()


def test_allowed_worker_key_gets_the_run_spec(closed_swarm) -> None:
    spec = answer_to_hello(closed_swarm.server.endpoint, closed_swarm.allowed, timeout_s=10)
    assert isinstance(spec, m.RunSpec) and spec.run_id == "auth-test"
    assert list(closed_swarm.server.worker_table()) == ["w"]


def test_trainers_own_key_is_accepted_for_local_workers(closed_swarm) -> None:
    own = CurveClient(closed_swarm.trainer, closed_swarm.trainer.public)
    assert isinstance(answer_to_hello(closed_swarm.server.endpoint, own, 10), m.RunSpec)


def unknown_key(trainer_public: bytes) -> CurveClient:
    public, secret = zmq.curve_keypair()
    return CurveClient(KeyPair(public, secret), trainer_public)


@pytest.mark.parametrize(
    "who",
    [
        pytest.param(lambda swarm: unknown_key(swarm.trainer.public), id="unknown-key"),
        pytest.param(lambda swarm: None, id="no-curve"),
        pytest.param(
            lambda swarm: CurveClient(swarm.allowed.keys, zmq.curve_keypair()[0]),
            id="wrong-trainer-key",
        ),
    ],
)
def test_others_get_nothing(closed_swarm, who) -> None:
    endpoint = closed_swarm.server.endpoint
    assert answer_to_hello(endpoint, who(closed_swarm), timeout_s=2) is None
    assert closed_swarm.server.worker_table() == {}
    # The trainer was up all along: an allowed worker still gets in.
    assert isinstance(answer_to_hello(endpoint, closed_swarm.allowed, 10), m.RunSpec)


def test_stop_ends_the_authenticator(closed_swarm) -> None:
    def authenticators() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if type(t).__name__ == "AuthenticationThread"]

    assert authenticators()
    closed_swarm.server.stop()
    assert not authenticators()


def test_missing_trainer_key_is_an_error(tmp_path: Path) -> None:
    allow = tmp_path / "allowed.txt"
    allow.write_text("")
    with pytest.raises(KeyFileError, match=re.escape("needs swarm.trainer_key")):
        SwarmServer(
            Config(swarm=SwarmConfig(allow_keys=str(allow))),
            None,
            None,
            [],
            LeaseBook(seed=0, lease_timeout_s=60.0),
            SimpleNamespace(version=0),
            "x",
        )


# ---- swarmrl run / train and the CLI ----------------------------------------------------


def test_local_run_generates_and_reuses_the_trainer_key(tmp_path: Path) -> None:
    allow = tmp_path / "allowed.txt"
    allow.write_text("")
    config = Config(swarm=SwarmConfig(allow_keys=str(allow)))
    close_swarm(config, tmp_path / "run")
    secret = tmp_path / "run" / "trainer.key_secret"
    assert config.swarm.trainer_key == str(secret.resolve())
    pair = load_key_pair(secret)
    again = Config(swarm=SwarmConfig(allow_keys=str(allow)))
    close_swarm(again, tmp_path / "run")  # a resumed run keeps the key workers know
    assert load_key_pair(again.swarm.trainer_key) == pair
    command = worker_command("tcp://127.0.0.1:1", "worker-1", config, tmp_path / "run")
    key = command[command.index("--key") + 1]
    trainer_key = command[command.index("--trainer-key") + 1]
    assert load_curve_client(key, trainer_key) == CurveClient(pair, pair.public)


def test_open_swarm_passes_no_keys(tmp_path: Path) -> None:
    config = Config()
    close_swarm(config, tmp_path / "run")
    assert config.swarm.trainer_key is None and not (tmp_path / "run").exists()
    assert "--key" not in worker_command("tcp://127.0.0.1:1", "worker-1", config, tmp_path)


def swarmrl_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarmrl", *arguments], capture_output=True, text=True, timeout=60
    )


def test_cli_keys_new(tmp_path: Path) -> None:
    done = swarmrl_cli("keys", "new", "gpu-box", "--dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    pair = load_key_pair(tmp_path / "keys" / "gpu-box.key_secret")
    assert f"public key  {pair.public.decode()}\n" in done.stdout
    assert "--key" in done.stdout and "--allow-keys" in done.stdout
    assert (tmp_path / "keys" / "gpu-box.key_secret").stat().st_mode & 0o777 == 0o600
    again = swarmrl_cli("keys", "new", "gpu-box", "--dir", str(tmp_path / "keys"))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert load_key_pair(tmp_path / "keys" / "gpu-box.key_secret") == pair


def test_cli_worker_key_errors(tmp_path: Path) -> None:
    missing = tmp_path / "me.key_secret"
    done = swarmrl_cli(
        "worker", "--connect", "tcp://127.0.0.1:1", "--key", str(missing), "--trainer-key", "x"
    )
    assert done.returncode == 2 and f"{missing}: key file not found" in done.stderr
    alone = swarmrl_cli("worker", "--connect", "tcp://127.0.0.1:1", "--key", str(missing))
    assert alone.returncode == 2 and "both --key and --trainer-key" in alone.stderr
