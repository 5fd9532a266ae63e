"""`make demo`: the main job on the embedded default, offline.

Today it runs what is built: prepare the packaged SmolLM2 (converted once, then cached),
validate the sample chat file line by line, tokenize it with the model's chat template, and
fine-tune a LoRA adapter for a few steps with the adaptive-KL loop (rows marked risky in the
file are tethered to the reference, benign rows train normally). ``--quick`` does the same on
the tiny random model in seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "core" / "sample_data" / "benign_chat.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny random model, seconds")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=None, help="adapter directory")
    args = parser.parse_args(argv)

    from cli.main import quiet_transformers

    quiet_transformers()

    from safety.schedules import preset_config
    from workers.models import load
    from workers.pipeline import load_training_file, progress_bar
    from workers.training import LoraSpec, TrainingConfig, train

    model_id = "tiny-random" if args.quick else "smollm2-135m-instruct"
    steps = args.steps or (4 if args.quick else 3)
    out = args.out or Path(tempfile.mkdtemp(prefix="tether-demo-")) / "adapter"

    _banner(f"1. Model: {model_id}")
    started = time.perf_counter()
    model, tokenizer, spec = load(model_id, device="cpu")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"   {params:.1f}M parameters, cached at {spec.path} ({_since(started)})")

    _banner(f"2. Data: {SAMPLE.name}")
    examples, issues = load_training_file(SAMPLE, model_id)
    for issue in issues:
        print(f"   {issue}")
    risky = sum(1 for ex in examples if (ex.risk or 0) > 0)
    tokens = sum(len(ex.input_ids) for ex in examples)
    print(f"   {len(examples)} valid examples ({risky} with a risk score), {tokens} tokens")
    if issues:
        return 1

    _banner(f"3. Fine-tune: preset 'adaptive', {steps} steps")
    config = TrainingConfig(
        lora=LoraSpec(r=8, alpha=16),
        regularizer=preset_config("adaptive"),
        learning_rate=2e-4,
        batch_size=4 if args.quick else 8,
        max_steps=steps,
        warmup_ratio=0.0,
    )
    result = train(
        model,
        spec,
        examples,
        config,
        pad_token_id=tokenizer.pad_token_id,
        out_dir=out,
        progress=progress_bar(),
    )
    last = result.history[-1]
    print(
        f"   {result.steps} steps in {result.seconds:.1f} s: loss {last.loss:.3f}, "
        f"CE {last.ce:.3f}, KL {last.kl:.4f}, mean beta {last.beta_mean:.2f}, "
        f"{last.tokens_per_s:.0f} tokens/s"
    )
    print(f"   adapter: {result.adapter_dir}")
    (out.parent / "run.json").write_text(json.dumps(result.to_dict(), indent=2))

    _banner("Next")
    print(
        "   tether train --model smollm2-135m-instruct --data FILE.jsonl --preset adaptive "
        "--out DIR"
    )
    print("   tether data validate FILE.jsonl --model smollm2-135m-instruct")
    return 0


def _banner(text: str) -> None:
    print(f"\n== {text}")


def _since(started: float) -> str:
    return f"{time.perf_counter() - started:.1f} s"


if __name__ == "__main__":
    raise SystemExit(main())
