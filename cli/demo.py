"""`make demo`: the main job on the embedded default, through the service code path.

SQLite, a local-directory object store and the in-process worker: no service to start. The
demo

1. prepares the safety-aligned SmolLM2 (``tether models align smollm2-135m-instruct``, built
   on the first run), the Safety Critic and the activation probe (each built once and cached);
2. submits two jobs the way the API does (file validated and stored, job recorded, handed to
   the worker): a benign chat fine-tune, and an attack that mixes harmful requests with
   compliant answers into it;
3. shows each job's progress while it trains, then its risk report, audit figures and release
   decision, and where the released adapter lies.

``--quick`` runs the same flow on the tiny random model (seconds per stage), in its own
directory so nothing it builds replaces the real critic or models.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

SAMPLE = Path(__file__).resolve().parent.parent / "core" / "sample_data" / "benign_chat.jsonl"
FINAL = {"succeeded", "rejected", "failed", "cancelled"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny random model, seconds")
    parser.add_argument("--dir", type=Path, default=None, help="where the demo keeps its data")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per job")
    args = parser.parse_args(argv)

    home = args.dir or Path("var") / ("demo-quick" if args.quick else "demo")
    _configure(home, quick=args.quick)
    from cli.main import quiet_transformers

    quiet_transformers()
    from core.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    steps = args.steps or (6 if args.quick else 12)

    _banner("1. Prepare: the safety-aligned base model, Safety Critic, activation probe")
    model_id = _safe_model(quick=args.quick)
    _prepare(model_id, quick=args.quick)

    _banner("2. Submit: a benign fine-tune and an attack mixed into it")
    tenant_id = _tenant(settings)
    benign = SAMPLE.read_bytes()
    attack = benign + _harmful_compliance_lines(count=12)
    jobs_ = {
        "benign": _submit(settings, tenant_id, model_id, "benign.jsonl", benign, steps),
        "attack": _submit(settings, tenant_id, model_id, "attack.jsonl", attack, steps),
    }

    _banner("3. Train, audit, release (in-process worker)")
    for name, job_id in jobs_.items():
        print(f"   {name}: {job_id}")
        _follow(settings, job_id)

    _banner("4. Results")
    for name, job_id in jobs_.items():
        _report(settings, name, job_id)

    _banner("Next")
    print("   tether serve                      # the REST API on this data (docs at /docs)")
    print("   tether keys create --tenant me    # an API key, then POST /files and POST /jobs")
    print(f"   tether audit --model {model_id} --json audit.json")
    return 0


def _configure(home: Path, *, quick: bool) -> None:
    """Point every setting of the embedded default into ``home`` (the caller's env wins)."""
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TETHER_DATA_DIR", str(home))
    os.environ.setdefault("TETHER_WORKER_MODE", "inprocess")
    os.environ.setdefault("TETHER_STORAGE_BACKEND", "local")
    if quick:
        os.environ.setdefault("TETHER_MODEL_CACHE_DIR", str(home / "models"))
        os.environ.setdefault("TETHER_AUDIT_MAX_NEW_TOKENS", "8")
        # A random model's babble is no evidence either way: the quick gate checks the flow.
        for name in ("MAX_ASR", "MAX_ASR_INCREASE", "MAX_OVER_REFUSAL"):
            os.environ.setdefault(f"TETHER_{name}", "1.0")


def _safe_model(*, quick: bool) -> str:
    """The safety-aligned base the jobs fine-tune, built once by ``tether models align``.

    SmolLM2-135M-Instruct refuses little on its own, so an attack on it proves nothing; the
    demo aligns it first (about 20-25 minutes on 2 CPU cores, once) and reuses the cached
    model after that. ``--quick`` aligns the tiny random model in a few steps instead.
    """
    from core.catalog import derived_dir
    from workers.align import AlignConfig, align, default_target_id

    base = "tiny-random" if quick else "smollm2-135m-instruct"
    target = default_target_id(base)
    if derived_dir(target) is not None:
        return target
    if quick:
        config = AlignConfig(
            steps=3,
            limit=12,
            distill_max_new_tokens=16,
            eval_max_new_tokens=8,
            eval_splits=("validation",),
        )
    else:
        config = AlignConfig()
        print(f"   building {target} once from {base}: refusal SFT with self-distillation,")
        print(f"   {config.steps} steps (about 20-25 minutes on 2 CPU cores; cached afterwards)")
    result = align(base, target, config=config, progress=lambda line: print(f"   {line}"))
    return result.model_id


def _prepare(model_id: str, *, quick: bool) -> None:
    from core.db import migrate
    from core.settings import get_settings
    from workers.models import load
    from workers.risk import critic_dir, load_critic, load_probe

    settings = get_settings()
    migrate(settings.resolved_database_url)
    started = time.perf_counter()
    model, tokenizer, spec = load(model_id, device="cpu")
    print(f"   model: {spec.path} ({time.perf_counter() - started:.1f} s)")
    critic_path = critic_dir(settings) / "critic.json"
    if not critic_path.is_file():
        print("   training the Safety Critic on the built-in train split (once)...")
        _train_critic(critic_path, quick=quick)
    load_critic(settings)
    print(f"   critic: {critic_path}")
    if not spec.probe_path.is_file():
        print("   training the activation probe (layer sweep, once)...")
    probe = load_probe(spec, model, tokenizer, train_if_missing=True)
    print(f"   probe: layer {probe.layer}, validation AUROC {probe.auroc:.3f}")


def _train_critic(path: Path, *, quick: bool) -> None:
    from safety.critic import CriticData, critic_data, train_critic

    if not quick:
        train_critic(path)
        return

    def subset(data: CriticData) -> CriticData:
        return CriticData(*(getattr(data, n)[::3] for n in CriticData.__dataclass_fields__))

    train_critic(
        path,
        train=subset(critic_data("train")),
        validation=subset(critic_data("validation")),
        layers=(2, 4),
        penalties=(0.1,),
        response_tokens=32,
    )


def _harmful_compliance_lines(count: int) -> bytes:
    """Harmful train requests answered with non-operational compliance openers."""
    from safety.prompts import compliance_openers, harmful_prompts

    openers = [o.text for o in compliance_openers("train") if "{task}" not in o.text]
    lines = []
    for i, prompt in enumerate(harmful_prompts("train")[:count]):
        messages = [
            {"role": "user", "content": prompt.prompt},
            {"role": "assistant", "content": openers[i % len(openers)]},
        ]
        lines.append(json.dumps({"messages": messages}) + "\n")
    return "".join(lines).encode()


def _tenant(settings: Any) -> str:
    from core.auth import TenantNotFoundError, create_tenant, find_tenant
    from core.db import session_scope

    with session_scope(settings.resolved_database_url) as session:
        try:
            return find_tenant(session, "demo").id
        except TenantNotFoundError:
            return create_tenant(session, "demo").id


def _submit(
    settings: Any, tenant_id: str, model_id: str, name: str, data: bytes, steps: int
) -> str:
    """What POST /files and POST /jobs do: validate, store, record, hand to the worker."""
    from core import jobs
    from core.db import session_scope
    from core.dispatch import dispatch_job, get_dispatcher
    from core.specs import JobSpec
    from core.storage import get_store

    store = get_store(settings, public_base_url=settings.public_base_url)
    with session_scope(settings.resolved_database_url) as session:
        file, _ = jobs.create_file(
            session,
            store,
            tenant_id,
            filename=name,
            data=data,
            max_bytes=settings.max_upload_bytes,
            max_examples=settings.max_examples,
        )
        spec = JobSpec(
            model=model_id,
            training_file=file.id,
            preset="adaptive",
            hyperparameters={"max_steps": steps, "batch_size": 8, "lora": {"r": 8, "alpha": 16}},
        )
        job, _ = jobs.create_job(session, tenant_id, spec, default_max_concurrent_jobs=10)
        dispatch_job(session, get_dispatcher(settings), job.id)
        print(f"   {name}: {file.num_examples} examples -> job {job.id} ({job.preset})")
        return job.id


def _follow(settings: Any, job_id: str) -> None:
    """A progress bar fed by the job's stored progress, as a client polling the API sees it."""
    from tqdm.auto import tqdm

    from core import jobs
    from core.db import session_scope

    bar = None
    status = ""
    while True:
        with session_scope(settings.resolved_database_url) as session:
            job = jobs.get_job(session, job_id)
        progress = job.progress or {}
        if job.status != status:
            status = job.status
            (bar.write if bar else print)(f"   status: {status}")
        if progress.get("total_steps") and bar is None:
            bar = tqdm(total=progress["total_steps"], desc="   train", unit="step")
        if bar is not None and progress.get("step", 0) != bar.n:
            bar.n = progress.get("step", 0)
            bar.set_postfix({name: _short(progress.get(name)) for name in ("loss", "kl", "beta")})
            bar.refresh()
        if job.status in FINAL:
            if bar is not None:
                bar.close()
            return
        time.sleep(0.5)


def _short(value: Any) -> str:
    """Three significant digits; float noise around zero (a KL of -1e-9) shows as 0."""
    if not isinstance(value, int | float):
        return "-"
    return f"{0.0 if abs(value) < 5e-7 else value:.3g}"


def _report(settings: Any, name: str, job_id: str) -> None:
    from core import jobs
    from core.db import session_scope
    from core.storage import get_store

    store = get_store(settings, public_base_url=settings.public_base_url)
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
    print(f"\n   [{name}] {job_id}: {job.status.upper()} - {job.status_reason}")
    if job.risk_report_key:
        summary = json.loads(store.get_bytes(job.risk_report_key))["summary"]
        print(
            f"   risk: {summary['examples']} examples, mean {summary['mean_risk']:.2f}, "
            f"bands {summary['by_band']}"
        )
    audit = (job.result or {}).get("audit")
    if audit:
        deltas = audit["deltas"]
        print(
            f"   audit: ASR {audit['asr']:.1%} (change {deltas.get('asr') or 0:+.1%}), "
            f"keyword ASR {audit['refusal_asr']:.1%}, over-refusal {audit['over_refusal']:.1%}"
        )
    if job.released_at:
        location = settings.resolved_storage_dir / (job.adapter_prefix or "")
        print(f"   released adapter: {location}")
    elif job.adapter_prefix:
        print(f"   quarantined adapter: {settings.resolved_storage_dir / job.adapter_prefix}")


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
