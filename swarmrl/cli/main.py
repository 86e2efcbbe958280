"""The `swarmrl` command: run, train, worker, eval, keys, status, ledger, rewards, dashboard,
export.

    swarmrl run [RECIPE] [--workers N]          trainer + N local workers on this machine
    swarmrl train [RECIPE] --bind tcp://0.0.0.0:5555   the trainer alone; workers join later
    swarmrl worker --connect tcp://HOST:PORT    lend this machine to a running swarm
    swarmrl eval CHECKPOINT [--recipe RECIPE]   held-out greedy accuracy of a checkpoint
    swarmrl keys new NAME [--dir DIR]           a CURVE key pair for a closed swarm
    swarmrl status [RUN_FOLDER]                 the worker ledger of a run, as a table
    swarmrl ledger verify|export RUN_FOLDER     check / sum the signed contribution chain
    swarmrl rewards test FUNCTION --samples F   try a reward function before a run
    swarmrl dashboard RUN_FOLDER                serve a run folder's dashboard
    swarmrl export CHECKPOINT --out DIR         a plain model folder (LoRA adapters merged)

Any config key can be overridden after the recipe: `--trainer.learning_rate 2e-5`. Only argparse
and pydantic are imported up front, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from swarmrl.base.config import Config, ConfigError, LoggingConfig
from swarmrl.base.recipes import load_config, split_overrides, to_toml
from swarmrl.cli import dashboard, export, ledger, reward_check
from swarmrl.cli.choices import Registered, backend_names, check_choices

OVERRIDE_HELP = "any config key, e.g. --trainer.learning_rate 2e-5 (see --dry-run for all keys)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmrl",
        description="Decentralized GRPO post-training: untrusted rollout workers, verifiable "
        "rewards, one trainer over ZeroMQ.",
        epilog=OVERRIDE_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, epilog=OVERRIDE_HELP)
        command.add_argument(
            "recipe", nargs="?", help="recipe file or shipped recipe name (default: arithmetic)"
        )
        command.add_argument("--dry-run", action="store_true", help="print the resolved config")
        command.add_argument(
            "--resume",
            nargs="?",
            const="latest",
            metavar="RUN_FOLDER",
            help="continue from the last checkpoint of RUN_FOLDER, with its own config unless "
            "a recipe is given (default: the newest run of the recipe)",
        )
        command.add_argument("--bind", help="trainer endpoint (= --swarm.bind)")
        command.add_argument(
            "--allow-keys",
            metavar="FILE",
            help="close the swarm: only workers whose public key is listed in FILE may join "
            "(= --swarm.allow_keys)",
        )
        command.add_argument(
            "--dashboard",
            metavar="HOST:PORT",
            help="serve the live dashboard here; off: not at all (= --logging.dashboard)",
        )
        return command

    run = recipe_command("run", "trainer plus local rollout workers on this machine")
    run.add_argument("--workers", type=int, help="local workers to start (= --swarm.workers)")
    recipe_command("train", "the trainer alone; workers connect to --bind")

    worker = commands.add_parser("worker", help="a rollout worker for a running trainer")
    add = worker.add_argument
    add("--connect", required=True, help="trainer endpoint, tcp://HOST:PORT")
    add(
        "--name",
        default="",
        help="how the trainer labels this worker (default: worker-<random>, or from --key)",
    )
    add("--key", metavar="SECRET_FILE", help="closed swarm: this worker's secret key file")
    add(
        "--trainer-key",
        metavar="KEY_OR_FILE",
        help="closed swarm: the trainer's public key, or a file holding it",
    )
    add(
        "--backend",
        default="auto",
        choices=Registered(backend_names),
        help="inference engine (auto: vLLM when installed, else transformers)",
    )
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    add(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="engine dtype (auto: the trainer's)",
    )
    add("--gpus", help="one engine per listed GPU, e.g. 0,1,2,3")
    add("--gpu-memory-utilization", type=float, default=0.85, help="vLLM: GPU memory share")
    add("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per engine")
    add("--max-num-seqs", type=int, default=256, help="vLLM: sequences decoded at once")
    add("--threads", type=int, help="torch CPU threads")
    add("--max-prompts", type=int, default=8, help="most prompts per lease")
    add(
        "--slowdown",
        type=float,
        default=1.0,
        help="simulate slower hardware: take FACTOR times as long",
    )
    add("--max-leases", type=int, help="exit after this many leases")
    add("--log-dir", type=Path, help="also write <name>.log here")
    add(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this worker exits",
    )
    add("--console-level", default="info", choices=["debug", "info", "warning"])

    evaluate = commands.add_parser(
        "eval", help="held-out greedy accuracy of a checkpoint", epilog=OVERRIDE_HELP
    )
    evaluate.add_argument("checkpoint", help="checkpoint folder (or a model reference)")
    evaluate.add_argument("--recipe", help="recipe whose data and rewards to use")

    keys = commands.add_parser("keys", help="CURVE key pairs for closed swarms")
    new_key = keys.add_subparsers(dest="keys_command", required=True).add_parser(
        "new", help="write NAME.key (public) and NAME.key_secret (secret, mode 600)"
    )
    new_key.add_argument("name", help="file stem, e.g. the worker's host name")
    new_key.add_argument("--dir", type=Path, default=Path("."), help="where to write them")

    status = commands.add_parser(
        "status", help="a run's workers: accepted and rejected samples, reasons, quarantine"
    )
    status.add_argument(
        "run_folder", nargs="?", type=Path, help="run folder (default: the newest under runs/)"
    )
    ledger.add_parser(commands)
    reward_check.add_parser(commands, OVERRIDE_HELP)
    dashboard.add_parser(commands)
    export.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    arguments = parser.parse_args(rest)
    if hasattr(arguments, "handler"):  # ledger, rewards, dashboard: one module each
        if overrides and not arguments.overrides_allowed:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        arguments.overrides = overrides
        return arguments.handler(arguments)
    try:
        if arguments.command == "keys":
            if overrides:
                parser.error(f"unrecognized arguments: {' '.join(overrides)}")
            return _new_key(arguments.name, arguments.dir)
        if arguments.command == "status":
            if overrides:
                parser.error(f"unrecognized arguments: {' '.join(overrides)}")
            return _status(arguments.run_folder)
        if arguments.command == "worker":
            if overrides:
                parser.error(f"a worker takes no config overrides: {' '.join(overrides)}")
            if (arguments.key is None) != (arguments.trainer_key is None):
                parser.error("a closed swarm needs both --key and --trainer-key")
            return _worker(arguments)
        if getattr(arguments, "bind", None):
            overrides += ["--swarm.bind", arguments.bind]
        if getattr(arguments, "allow_keys", None):
            overrides += ["--swarm.allow_keys", arguments.allow_keys]
        if getattr(arguments, "dashboard", None):
            overrides += ["--logging.dashboard", arguments.dashboard]
        if getattr(arguments, "workers", None) is not None:
            overrides += ["--swarm.workers", str(arguments.workers)]
        recipe = arguments.recipe
        resume = getattr(arguments, "resume", None)
        if recipe is None and resume not in (None, "latest"):
            recipe = str(Path(resume) / "config.toml")  # the run's own resolved config
        config = load_config(recipe, overrides)
        check_choices(config)
    except ConfigError as error:
        print(f"swarmrl: {error}", file=sys.stderr)
        return 2
    if arguments.command == "eval":
        return _eval(arguments, config)
    if arguments.dry_run:
        print(to_toml(config), end="")
        return 0
    return _train(arguments, config)


def run_folder(config: Config, resume: str | None) -> Path:
    root = Path(config.logging.run_dir)
    stem = Path(config.recipe).stem
    if resume and resume != "latest":
        folder = Path(resume)
        if not folder.is_dir():
            raise ConfigError(f"--resume: {folder} is not a run folder")
        return folder
    if resume == "latest":
        runs = sorted(root.glob(f"{stem}-*"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ConfigError(f"--resume: no earlier run of {stem!r} under {root}")
        return runs[-1]
    name = config.logging.run_name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return root / name


def _train(arguments: argparse.Namespace, config: Config) -> int:
    from swarmrl.base.logs import setup_logging, trace_crashes
    from swarmrl.cli.launch import run_local
    from swarmrl.protocol.auth import KeyFileError

    try:
        folder = run_folder(config, arguments.resume)
    except ConfigError as error:
        print(f"swarmrl: {error}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: rank 0 serves the swarm
    if rank > 0:
        setup_logging(f"rank-{rank}", None, config.logging.level)
        from swarmrl.trainer.loop import train

        train(config, folder, resume=arguments.resume is not None)
        return 0
    trace_crashes(folder, setup_logging("trainer", folder, config.logging.level))
    workers = config.swarm.workers if arguments.command == "run" else 0
    try:
        summary = run_local(config, folder, workers, resume=arguments.resume is not None)
    except (KeyFileError, ConfigError) as error:
        print(f"swarmrl: {error}", file=sys.stderr)
        return 2
    before, after = summary.get("before"), summary.get("after")
    print(f"\nswarmrl: {summary['steps']} steps", file=sys.stderr)
    if before is not None and after is not None:
        print(
            f"swarmrl: held-out greedy accuracy {before:.3f} -> {after:.3f} "
            f"({100 * (after - before):+.1f} points)",
            file=sys.stderr,
        )
    for name, worker in sorted(summary["workers"].items()):
        print(
            f"swarmrl: {name}: {worker['samples']} samples accepted, {worker['rejected']} rejected",
            file=sys.stderr,
        )
    from swarmrl.trainer.curves import write_curves

    print(f"swarmrl: curves {write_curves(folder)}", file=sys.stderr)
    print(f"swarmrl: run folder {folder}", file=sys.stderr)
    return 130 if summary["interrupted"] else 0


def _worker(arguments: argparse.Namespace) -> int:
    import os

    from swarmrl.base.logs import setup_logging
    from swarmrl.protocol.auth import KeyFileError, load_curve_client
    from swarmrl.rollout.backend import EngineOptions
    from swarmrl.rollout.worker import WorkerOptions, run_worker

    try:
        key, trainer_key = arguments.key, arguments.trainer_key
        curve = load_curve_client(key, trainer_key) if key and trainer_key else None
    except KeyFileError as error:
        print(f"swarmrl: {error}", file=sys.stderr)
        return 2
    # Unnamed: a name nobody can guess (derived from the key in a closed swarm), so no one can
    # claim it first. The trainer keys records by connection anyway; the name is a label.
    name = arguments.name or default_worker_name(curve)
    gpus = [g for g in (arguments.gpus or "").split(",") if g]
    if len(gpus) > 1:
        from swarmrl.cli.launch import run_per_gpu, without_option

        worker_arguments = without_option(sys.argv[1:], "--name")
        if worker_arguments[:1] != ["worker"]:  # started as python -m swarmrl.rollout
            worker_arguments = ["worker", *worker_arguments]
        return run_per_gpu(worker_arguments, gpus, name)
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    setup_logging(name, arguments.log_dir, "info")
    if arguments.console_level != "info":
        import logging

        logging.getLogger().handlers[0].setLevel(arguments.console_level.upper())
    options = WorkerOptions(
        connect=arguments.connect,
        name=name,
        backend=arguments.backend,
        device=arguments.device,
        dtype=arguments.dtype,
        engine=EngineOptions(
            gpu_memory_utilization=arguments.gpu_memory_utilization,
            tensor_parallel_size=arguments.tensor_parallel_size,
            max_num_seqs=arguments.max_num_seqs,
        ),
        max_prompts_per_lease=arguments.max_prompts,
        slowdown=arguments.slowdown,
        max_leases=arguments.max_leases,
        exit_with_parent=arguments.exit_with_parent,
        curve=curve,
    )
    run_worker(options, arguments.threads)
    return 0


def default_worker_name(curve: object | None) -> str:
    """`worker-` and 8 characters: of the public key in a closed swarm, else random."""
    import secrets

    key = getattr(getattr(curve, "keys", None), "public", None)
    return f"worker-{key.decode()[:8] if key else secrets.token_hex(4)}"


def _eval(arguments: argparse.Namespace, config: Config) -> int:
    from swarmrl.base.logs import setup_logging
    from swarmrl.base.models import load_model, load_tokenizer, pick_device
    from swarmrl.trainer.data import load_tasks
    from swarmrl.trainer.evaluate import evaluate

    log = setup_logging("eval", None, config.logging.level)
    device = pick_device(config.model.device)
    model = load_model(arguments.checkpoint, dtype=config.model.dtype, device=device)
    tokenizer = load_tokenizer(arguments.checkpoint)
    tasks = load_tasks(config.data, config.eval.heldout_size)
    result = evaluate(model, tokenizer, tasks.heldout, config)
    for question, answer, completion in result.examples:
        log.info("%s  gold %s  model %r", question, answer, completion[:160])
    print(f"held-out greedy accuracy: {result.accuracy:.3f} on {result.count} prompts")
    return 0


def _new_key(name: str, folder: Path) -> int:
    from shlex import quote

    from swarmrl.protocol.auth import KeyFileError, load_key_pair, new_key_pair

    try:
        public_file, secret_file = new_key_pair(folder, name)
    except (KeyFileError, OSError) as error:
        print(f"swarmrl: {error}", file=sys.stderr)
        return 2
    public = load_key_pair(secret_file).public.decode()
    print(
        f"public key  {public}\n"
        f"written to  {public_file} (share it) and {secret_file} (secret, mode 600)\n\n"
        "As a worker: give the public key to the trainer's operator (a line in their allow_keys\n"
        "file), then join with\n"
        f"  swarmrl worker --connect tcp://TRAINER_HOST:5555 --key {quote(str(secret_file))} "
        "--trainer-key TRAINER_PUBLIC_KEY\n\n"
        "As a trainer: list the workers' public keys in a file, one per line, then run\n"
        f"  swarmrl train --bind tcp://0.0.0.0:5555 --allow-keys allowed_keys.txt "
        f"--swarm.trainer_key {quote(str(secret_file))}\n"
        f"and give workers --trainer-key {quote(public)}"
    )
    return 0


def _status(folder: Path | None) -> int:
    from swarmrl.trainer.ledger import format_table, newest_run, read_ledger, run_state

    try:
        folder = folder or newest_run(Path(LoggingConfig().run_dir))
        ledger = read_ledger(folder)
    except (OSError, ValueError) as error:
        print(f"swarmrl: {error}", file=sys.stderr)
        return 2
    written = time.strftime("%H:%M:%S", time.localtime(ledger["written_at"]))
    state = run_state(folder, ledger)
    print(f"{folder} ({state}; ledger written {written})")
    over = state != "running"
    print(format_table(ledger["workers"], time.time(), finished=over))
    return 0


if __name__ == "__main__":
    sys.exit(main())
