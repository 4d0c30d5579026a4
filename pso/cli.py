"""The `pso` command: one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pso.config import ConfigError, dump_config, load_config
from pso.config.schema import PSOConfig
from pso.logs import FORMATS, setup_logging
from pso.tiny.flow import FLOW_ARCHS
from pso.transport.base import TransportError

log = logging.getLogger("pso")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("PSO_CONFIG") or None,
        help="YAML file (see configs/); default: $PSO_CONFIG, else built-in defaults",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set loss.beta=20 (repeatable; beats PSO__* variables)",
    )


def _load(args) -> PSOConfig:
    return load_config(PSOConfig, args.config, overrides=args.overrides)


def cmd_demo(args) -> int:
    from pso.demo import run_demo

    summary = run_demo(args.out, rounds=args.rounds)
    print(f"online PSO on the tiny model toward '{summary['target']}' (bigger shapes), {summary['rounds']} rounds:")
    for steps, rewards in summary["steps"].items():
        print(
            f"  {steps} step(s): "
            + ", ".join(
                f"{name} {r['base_mean']:.3f} -> {r['mean']:.3f}"
                + (f" (wins {r['win_rate']:.0%})" if name == "large" else "")
                for name, r in rewards.items()
            )
        )
    print(f"before/after picture: {summary['grid']}")
    print(f"trained LoRA: {summary['weights']}; per-round log: {args.out / 'summary.json'}")
    return 0


def cmd_families(args) -> int:
    from pso.families import FAMILIES

    for r in FAMILIES.values():
        print(
            f"{r.name:16} {'/'.join(r.arch):8} sampler={r.sampler:16} steps={list(r.steps)} "
            f"default={r.default_steps} guidance={r.guidance_scale}\n{'':16} {r.description}"
        )
    return 0


def cmd_config(args) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def cmd_sample(args) -> int:
    from pso.images import save_grid
    from pso.sampling import sample_groups
    from pso.tuned import load_tuned

    cfg = _load(args)
    policy = load_tuned(cfg.model, args.weights)
    group = args.group_size or cfg.sampling.group_size
    traj = sample_groups(
        policy,
        args.prompt,
        group,
        args.seed if args.seed is not None else cfg.sampling.seed,
        batch_size=cfg.sampling.batch_size,
        progress=True,
    )
    rows = [traj.images[traj.group(p)] for p in range(len(args.prompt))]
    grid = save_grid(rows, args.out / "samples.png", [p[:22] for p in args.prompt])
    info = {
        "family": cfg.model.family,
        "sampler": policy.sampler.kind,
        "timesteps": traj.timesteps.tolist(),
        "stds": traj.stds.tolist(),
        "seeds": traj.seeds,
        "states_shape": list(traj.states.shape),
        "latent_std_per_step": [float(traj.states[:, k].std()) for k in range(traj.num_steps + 1)],
    }
    (args.out / "trajectories.json").write_text(json.dumps(info, indent=2))
    print(f"sampled {len(traj.seeds)} images at timesteps {info['timesteps']}: {grid}")
    return 0


def cmd_tiny_random(args) -> int:
    from pso.tiny.flow import FLOW_ARCHS, flow_builders
    from pso.tiny.pipelines import build_tiny_pipeline

    if args.arch in FLOW_ARCHS:
        if args.lcm:
            raise ValueError(
                f"--lcm gives a UNet an LCM guidance embedding: it is for --arch sd or sdxl, not {args.arch}"
            )
        path = flow_builders()[args.arch](args.out, seed=args.seed)
    else:
        path = build_tiny_pipeline(args.out, args.arch, seed=args.seed, time_cond_proj_dim=8 if args.lcm else None)
    print(f"tiny random {args.arch} pipeline written to {path}")
    return 0


def cmd_tiny_build(args) -> int:
    if args.flow:
        from pso.tiny.flow_build import FlowBuildConfig as Config
        from pso.tiny.flow_build import build_tiny_flow_model as build
    else:
        from pso.tiny.build import BuildConfig as Config
        from pso.tiny.build import build_tiny_model as build

    report = build(args.out, Config.quick(args.seed) if args.quick else Config(seed=args.seed))
    for name, scores in report["scores"].items():
        print(f"{name:18} " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"built in {report['seconds']['total']:.0f} s; student pipeline: {args.out / 'student'}")
    return 0


def cmd_export(args) -> int:
    from pso.codecs import decode_weights
    from pso.export import export_bundle
    from pso.policy import DistilledPolicy

    if args.weights.startswith(("redis://", "rediss://", "unix://")):
        from pso.transport.redis import RedisWeightStore, connect

        cfg = _load(args).model_copy(deep=True)
        cfg.redis.url = args.weights
        store = RedisWeightStore(connect(cfg.redis), cfg.redis)
        version = args.version if args.version is not None else store.latest()
        if version is None:
            raise ValueError(f"run {cfg.redis.run!r} at {args.weights} has published no weights")
        data = store.fetch(version)
    else:
        from pso.export import locate_weights

        source = Path(args.weights)
        run_config = source / "config.yaml"  # a `pso up` run folder: the run's own config, for the model card
        if args.config is None and run_config.is_file():
            args.config = run_config
        cfg, data = _load(args), locate_weights(source).read_bytes()
    bundle = decode_weights(data)
    cfg.finetune = DistilledPolicy.finetune_of(bundle)
    if args.config is None:  # the model the bundle was trained on, as it records it
        cfg.model.pretrained = bundle.base_model
        cfg.model.family = bundle.metadata.get("family", cfg.model.family)
        cfg.model.dtype = bundle.metadata.get("dtype", cfg.model.dtype)
    elif bundle.base_model != cfg.model.pretrained:
        log.warning("the weights were trained on %s, the config names %s", bundle.base_model, cfg.model.pretrained)
    path = export_bundle(bundle, cfg, args.out, args.format)
    print(f"exported weights version {bundle.version} ({args.format}): {path}; model card: {args.out / 'README.md'}")
    return 0


def cmd_eval(args) -> int:
    from pso.evaluation import markdown_table, run_eval
    from pso.prompts import load_prompts
    from pso.tiny.rewards import REWARDS
    from pso.tuned import load_tuned

    cfg = _load(args)
    for key, value in (("pretrained", args.model), ("family", args.family), ("num_steps", args.steps)):
        if value is not None:
            setattr(cfg.model, key, value)
    names = [n.strip() for n in args.rewards.split(",") if n.strip()] if args.rewards else None
    if args.reward_url:  # the models of a running reward server (reward_server/, imported only here)
        from reward_server.client import RewardClient

        client = RewardClient(args.reward_url)
        client.wait_ready(60)
        rewards = client.reward_fns(names)
    else:
        names = names or ["fidelity", "large", "crispness"]
        unknown = [n for n in names if n not in REWARDS]
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; built-in rewards: {', '.join(REWARDS)}")
        rewards = {n: REWARDS[n] for n in names}
    prompts = load_prompts(args.prompts, max_prompts=args.max_prompts)
    policy = load_tuned(cfg.model, args.weights)
    result = run_eval(policy, prompts, rewards, args.seed, args.out, progress=True)
    print(markdown_table(result["rewards"]), end="")
    print(f"written: {args.out / 'eval.json'}, {args.out / 'eval.md'}, {args.out / 'grid.png'}")
    return 0


def cmd_reward_server(args) -> int:
    from reward_server.main import serve

    for key in ("host", "port", "workers"):
        if getattr(args, key) is not None:
            args.overrides.append(f"reward_server.{key}={getattr(args, key)}")
    return serve(_load(args).reward_server, access_log=args.access_log)


def cmd_actor(args) -> int:
    from actors.actor import run_actor

    cfg = _load(args)
    if cfg.preferences is not None:  # its records would pile up in Redis, read by nobody
        print(
            f"pso actor: this configuration trains offline on {cfg.preferences.source}: the learner reads its pairs "
            "itself and needs no actors (run none: docker compose --scale actor=0, or 0 replicas)",
            file=sys.stderr,
        )
        return 2
    stats = run_actor(cfg)
    print(f"actor: {stats.batches} batches, {stats.records} records, versions {stats.versions}")
    if stats.judgements:
        ties, inconsistent = stats.judged_ties, stats.judged_inconsistent
        print(f"judge: {stats.judgements} judgements, {ties} ties, {inconsistent} inconsistent")
    return 0


def cmd_learner(args) -> int:
    """Exit status: learner/launch.py (0 done, 1 failed, 2 configuration error, 137 killed, 143 stopped)."""
    from learner import launch

    agent = launch.needs_agent(args.nproc_per_node, args.nnodes, args.max_restarts)
    if agent and "TORCHELASTIC_RUN_ID" in os.environ:
        print(
            "pso learner: --nproc-per-node/--nnodes/--max-restarts are for the launching command, "
            "not for a rank under torchrun",
            file=sys.stderr,
        )
        return launch.CONFIG
    cfg = _load(args)  # a configuration error exits 2 here, in the launching process too
    if agent:
        rank_args = ["-v"] if args.verbose else []
        rank_args += ["learner"] + (["--config", str(args.config)] if args.config else [])
        rank_args += [a for o in args.overrides for a in ("--set", o)] + (["--resume"] if args.resume else [])
        try:
            return launch.run_node(args, rank_args)
        except launch.LaunchError as e:
            print(f"pso learner: {e}", file=sys.stderr)
            return launch.CONFIG
    problem = launch.check_rank()
    if problem is not None:
        print(f"pso learner: {problem}", file=sys.stderr)
        return launch.CONFIG
    from learner.learner import run_learner

    state = run_learner(cfg, resume=args.resume)
    limit = cfg.learner.max_updates
    if (limit is None or state.updates < limit) and not state.data_exhausted:  # offline: the data was used up
        # stopped by a signal before its work was done: not a success, or a Kubernetes Job would
        # count this node as complete and never run the learner again (it resumes on restart)
        print(f"pso learner: stopped at update {state.updates}; checkpointed", file=sys.stderr)
        return launch.STOPPED
    return launch.DONE


def cmd_health(args) -> int:
    import httpx

    url = args.url or os.environ.get("PSO_HEALTH_URL") or "http://127.0.0.1:8000/healthz"
    try:
        response = httpx.get(url, timeout=args.timeout)
    except httpx.ConnectError as e:
        if args.not_listening_ok:  # the ranks are between two starts of their supervisor: not a hang
            print(f"{url}: nothing listens ({e}); passing (--not-listening-ok)")
            return 0
        print(f"pso health: {url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"pso health: {url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    healthy = 200 <= response.status_code < 300
    print(f"{url}: {response.status_code} {response.text[:200]}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def cmd_preload(args) -> int:
    from huggingface_hub.utils import enable_progress_bars

    from pso.hub import describe, download, planned_downloads

    enable_progress_bars()  # the logging setup turns them off with the libraries' chatter; here they are the output
    plan = planned_downloads(_load(args))
    if not plan:
        print("nothing to download: every model source is local or built in")
        return 0
    for i, d in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {d.what}: {describe(d)}", flush=True)
        if not args.dry_run:
            print(f"        -> {download(d)}", flush=True)
    return 0


def cmd_up(args) -> int:
    from launcher.up import run_up

    for key, value in (("learner.max_updates", args.updates), ("up.actors", args.actors), ("up.run_dir", args.out)):
        if value is not None:
            args.overrides.append(f"{key}={value}")
    try:
        summary = run_up(_load(args))
    except KeyboardInterrupt:
        print("pso up: stopped; every process was shut down", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a process of the run failed; the message holds the end of its log
        print(f"pso up: {e}", file=sys.stderr)
        return 1
    print(f"weights version {summary['version']} against the base model on {summary['prompts']} prompts:")
    for name, m in summary["models"].items():
        print(
            f"  {name}: {m['base']:.4f} -> {m['tuned']:.4f} (gain {m['gain']:+.4f} +- {m['gain_stderr']:.4f}, "
            f"wins {m['win_rate']:.0%})"
        )
    if "experience" in summary:
        e = summary["experience"]
        print(
            f"experience: {e['produced']} records produced, {e['trained']} trained, {e['stale']} stale "
            f"({e['stale_share']:.1%} of those decided), {e['corrupt']} corrupt, {e['left']} left when the run "
            "stopped"
        )
    if "preferences" in summary:
        d = summary["preferences"]
        print(
            f"preferences: {d['pairs']} pairs of {d['source']} trained in {d['updates']} updates (rank 0 ended at "
            f"example {d['position']} of epoch {d['epoch'] + 1}; {d['ties']} ties and {d['bad_rows']} bad rows "
            "skipped)"
        )
    if "export" in summary:
        print(f"final weights for diffusers (pipe.load_lora_weights): {summary['export']}")
    return 0


def cmd_bench_quality(args) -> int:
    from pso.bench.quality import QualityBenchConfig, run_quality_bench
    from pso.bench.tasks import TaskBenchConfig, run_task_bench

    out = args.out or Path("runs") / f"bench-{args.task or 'quality'}"
    settings = {k: v for k, v in (("seeds", args.seeds and list(range(args.seeds))), ("rounds", args.rounds)) if v}
    if args.task:
        if args.flow:
            raise SystemExit("--task runs on the built-in UNet model; --flow is for the reward benchmark")
        result = run_task_bench(out, TaskBenchConfig(task=args.task, **settings))
    else:
        bench = QualityBenchConfig.flow(**settings) if args.flow else QualityBenchConfig(**settings)
        result = run_quality_bench(out, bench)
    print(result["markdown"], end="")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {result['grid']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pso",
        description="Online Pairwise Sample Optimization (PSO) for few-step, timestep-distilled diffusion models. "
        "Configuration: YAML (--config) < environment (PSO__SECTION__KEY=value) < --set KEY=VALUE.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, library warnings included")
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get("PSO_LOG_FORMAT") or "text",
        help="text lines with ISO 8601 times, or one JSON object per line (default: $PSO_LOG_FORMAT, else text); "
        "the processes it starts log the same way",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="online PSO on the built-in tiny model, on CPU, in a few minutes")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--rounds", type=int, default=120, help="online rounds (default 120)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("families", help="list the supported distilled model families and their samplers")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("config", help="validate a configuration and print it resolved")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("sample", help="sample groups of few-step images from a model and save a grid")
    _config_args(p)
    p.add_argument("--prompt", "-p", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--group-size", "-g", type=int, help="images per prompt (default sampling.group_size)")
    p.add_argument("--seed", type=int, help="default sampling.seed")
    p.add_argument(
        "--weights",
        type=Path,
        help="trained weights to apply: an exported LoRA folder or .safetensors file, a .psow bundle, a learner "
        "checkpoint or a run folder",
    )
    p.add_argument("--out", type=Path, default=Path("runs/sample"))
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="trained weights as a diffusers or kohya LoRA (or model folder), with a card")
    _config_args(p)
    p.add_argument(
        "weights",
        help="a .psow weight bundle, a learner checkpoint, a run folder (its newest checkpoint), or "
        "redis://host:port/db (the run's published weights)",
    )
    p.add_argument("--version", type=int, help="with redis://: the weight version (default: the latest)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="score a model or trained weights on a prompt set against the base model")
    _config_args(p)
    p.add_argument("--model", help="hub id, folder or builtin:tiny (default: the config's model.pretrained)")
    p.add_argument("--family", help="model family (default: the config's model.family)")
    p.add_argument(
        "--weights",
        type=Path,
        help="trained weights to evaluate against the base: an exported LoRA folder or .safetensors file, a .psow "
        "bundle, a learner checkpoint or a run folder",
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="a standard prompt set: parti (shipped), drawbench or hpsv2 (downloaded on first use), or a part "
        "of one as NAME:SUBSET (parti:Animals, parti:Complex, hpsv2:photo; docs/evaluation.md); or a text file, "
        "one prompt per line, or a JSON list",
    )
    p.add_argument(
        "--max-prompts",
        type=int,
        metavar="N",
        help="score only N prompts, evenly spaced through the set (each challenge or style keeps its share)",
    )
    p.add_argument(
        "--rewards",
        help="comma-separated rewards: built-in ones (default fidelity,large,crispness), or with --reward-url "
        "that server's models (default: all it serves)",
    )
    p.add_argument("--reward-url", help="score with a running reward server's models (pickscore, image-reward, ...)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reward-server", help="serve reward models over HTTP (default: the tiny-world reward)")
    _config_args(p)
    p.add_argument("--host", help="default reward_server.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default reward_server.port (8000)")
    p.add_argument("--workers", type=int, help="server processes, each with its own models (default 1)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_reward_server)

    p = sub.add_parser("actor", help="sample, score and push experience for the learner (needs Redis)")
    _config_args(p)
    p.set_defaults(func=cmd_actor)

    p = sub.add_parser(
        "learner", help="PSO updates with DeepSpeed; publishes weights (needs Redis, except offline on preferences)"
    )
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (fresh if none)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this node (run under torch's elastic agent)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the learner (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1 (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=29500, help="node 0's rendezvous port (default 29500)")
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=110,
        help="seconds the ranks get to checkpoint after SIGTERM before the agent kills them (default 110)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="when a rank fails, restart this node's ranks from the newest checkpoint up to this many times "
        "(default 0: the command exits; status codes in learner/launch.py)",
    )
    p.set_defaults(func=cmd_learner)

    p = sub.add_parser("up", help="Redis, the reward server, actors and the learner on this machine")
    _config_args(p)
    p.add_argument("--updates", type=int, help="stop after this many updates (default learner.max_updates)")
    p.add_argument("--actors", type=int, help="actor processes (default up.actors)")
    p.add_argument("--out", type=Path, help="run folder (default up.run_dir)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("preload", help="download every hub weight a config names into the cache (HF_HOME)")
    _config_args(p)
    p.add_argument("--dry-run", action="store_true", help="list the downloads only")
    p.set_defaults(func=cmd_preload)

    p = sub.add_parser("health", help="exit 0 if a service's health URL answers 2xx (for container health checks)")
    p.add_argument("--url", help="default $PSO_HEALTH_URL, else http://127.0.0.1:8000/healthz")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument(
        "--not-listening-ok",
        action="store_true",
        help="pass when nothing listens at the URL (connection refused), and fail only on an answer that is not "
        "2xx or none in time: a liveness probe of a process whose supervisor restarts it, such as the learner's "
        "rank 0 while the elastic agent starts its ranks again (the agent itself ends a failed start)",
    )
    p.set_defaults(func=cmd_health, quiet_libraries=False)

    bench = sub.add_parser("bench", help="benchmarks that print figures and write tables").add_subparsers(
        dest="bench", required=True, metavar="BENCH"
    )
    p = bench.add_parser("quality", help="online PSO vs baselines on the tiny model: target reward, fidelity, blur")
    p.add_argument("--seeds", type=int, help="independent runs per method (default 3; with --task 2)")
    p.add_argument("--rounds", type=int, help="online rounds per run (default 40; with --task 60, offline: steps)")
    p.add_argument(
        "--task",
        choices=["style", "subject", "offline"],
        help="PSO's other uses instead of the reward: target images (style, subject) or offline preference pairs",
    )
    p.add_argument("--out", type=Path, help="the run folder (default runs/bench-quality, or runs/bench-TASK)")
    p.add_argument(
        "--flow",
        action="store_true",
        help="the built-in flow-matching model (trained at noise level 0.7, evaluated at 0) instead of the UNet one",
    )
    p.set_defaults(func=cmd_bench_quality)

    tiny = sub.add_parser("tiny", help="the built-in tiny models").add_subparsers(
        dest="tiny", required=True, metavar="ACTION"
    )
    p = tiny.add_parser("build", help="train the built-in few-step model from scratch (about 25 min on 2 cores)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a seconds-long build with tiny step counts (for tests)")
    p.add_argument(
        "--flow",
        action="store_true",
        help="the flow-matching model (FLUX format, family tiny-flow) instead of the UNet one (family tiny)",
    )
    p.set_defaults(func=cmd_tiny_build)
    p = tiny.add_parser("random", help="write a tiny randomly initialised pipeline (for tests and trying things)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--arch",
        choices=["sd", "sdxl", *FLOW_ARCHS],
        default="sd",
        help="UNet: sd, sdxl; flow-matching transformers: flux (FLUX.1), flux2 (FLUX.2 klein), zimage (Z-Image), "
        "sd3 (SD3.5), qwenimage (Qwen-Image), sana (SANA-Sprint) (default sd)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lcm", action="store_true", help="give the UNet an LCM guidance embedding")
    p.set_defaults(func=cmd_tiny_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, getattr(args, "quiet_libraries", True), args.log_format)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"pso {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError, TransportError) as e:
        log.debug("failed", exc_info=True)
        print(f"pso {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
