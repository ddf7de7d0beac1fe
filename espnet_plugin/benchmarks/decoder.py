"""`python -m espnet_plugin.bin.benchmark_decoder`: beam-search time of the cached decoder against
ESPnet's stock TransformerDecoder, and the cache each attention variant keeps.

Both decoders run in ESPnet's BatchBeamSearch with the same weights (ours loads the stock
state_dict), the same encoder outputs, the same CTC prefix scorer, beam and CTC weight. <eos> is
suppressed in the output layers until the search appends it at the maximum length, so every run
makes exactly the same number of steps with a full beam. The other variants (GQA, MLA, linear)
are timed on random weights of the same sizes. Cache sizes are per hypothesis over all layers:
analytic, and checked against the bytes of a real decoding state.
"""

import argparse
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder

from espnet_plugin.benchmarks.timing import machine_info, write_report
from espnet_plugin.compat import BatchBeamSearch, CTCPrefixScorer
from espnet_plugin.nets.attention import cache_nbytes
from espnet_plugin.nets.transformer_decoder import CachedTransformerDecoder

# The variants' settings; "mha" uses the stock decoder's weights and positions.
VARIANTS = {
    "mha": {"position": "absolute"},
    "gqa": {
        "position": "rotary",
        "self_attention_type": "gqa",
        "self_attention_conf": {"n_kv_heads": 2},
        "src_attention_type": "gqa",
        "src_attention_conf": {"n_kv_heads": 2},
    },
    "mla": {
        "position": "rotary",
        "self_attention_type": "mla",
        "self_attention_conf": {"kv_latent_dim": 64, "rope_dim": 32},
        "src_attention_type": "mla",
        "src_attention_conf": {"kv_latent_dim": 64},
    },
    "linear": {
        "position": "rotary",
        "self_attention_type": "linear",
        "src_attention_type": "linear",
    },
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--seconds", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="utterance lengths")
    add("--frames_per_second", type=float, default=25.0, help="encoder frames (10 ms, 4x sub.)")
    add("--tokens_per_second", type=float, default=5.0, help="decoded tokens per second")
    add("--d_model", type=int, default=256)
    add("--heads", type=int, default=4)
    add("--linear_units", type=int, default=2048)
    add("--layers", type=int, default=6)
    add("--vocab", type=int, default=300)
    add("--beam", type=int, default=10)
    add("--ctc_weight", type=float, default=0.3)
    add("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    add("--repeats", type=int, default=2, help="runs per measurement; the fastest counts")
    # Beam-search ops are small: on a shared CPU, OpenMP synchronisation between threads can
    # cost more than the arithmetic, so the default measures one thread.
    add("--threads", type=int, default=1, help="torch threads; 0 keeps torch's default")
    add("--seed", type=int, default=0)
    add("--output", type=Path, default=Path("benchmark_decoder.json"))
    return parser.parse_args(argv)


def build_decoders(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The stock decoder and ours per variant, <eos> suppressed in every output layer."""
    sizes = dict(
        vocab_size=args.vocab,
        encoder_output_size=args.d_model,
        attention_heads=args.heads,
        linear_units=args.linear_units,
        num_blocks=args.layers,
        dropout_rate=0.0,
        positional_dropout_rate=0.0,
    )
    decoders = {"stock": TransformerDecoder(**sizes, use_flash_attn=False)}
    for name in args.variants:
        decoders[name] = CachedTransformerDecoder(**sizes, **VARIANTS[name])
    with torch.no_grad():
        for decoder in decoders.values():
            decoder.output_layer.bias[args.vocab - 1] = -1e4
    if "mha" in decoders:
        decoders["mha"].load_state_dict(decoders["stock"].state_dict())
    return {name: decoder.eval() for name, decoder in decoders.items()}


def decode(decoder, ctc: CTC, encoder_out: torch.Tensor, steps: int, args) -> tuple[float, object]:
    """Seconds of one BatchBeamSearch of ``steps`` steps, and its best hypothesis."""
    eos = args.vocab - 1
    search = BatchBeamSearch(
        scorers={"decoder": decoder, "ctc": CTCPrefixScorer(ctc=ctc, eos=eos)},
        weights={"decoder": 1.0 - args.ctc_weight, "ctc": args.ctc_weight},
        beam_size=args.beam,
        vocab_size=args.vocab,
        sos=eos,
        eos=eos,
        pre_beam_score_key="full",
    ).eval()
    with torch.no_grad():
        begin = time.perf_counter()
        best = search(encoder_out, maxlenratio=-steps, minlenratio=0.0)[0]
        seconds = time.perf_counter() - begin
    if len(best.yseq) != steps + 2:  # <sos>, the steps' tokens, the final <eos>
        raise RuntimeError(f"decoding made {len(best.yseq) - 2} steps instead of {steps}")
    return seconds, best


def cache_sizes(decoder: CachedTransformerDecoder, best, frames: int) -> dict:
    """Analytic cache bytes per hypothesis (all layers), checked against the best hypothesis'
    real state: its self-attention caches and the utterance's cross-attention memories."""
    tokens = len(best.yseq) - 2
    state = best.states["decoder"]
    analytic_self = sum(layer.self_attn.cache_bytes(tokens) for layer in decoder.decoders)
    analytic_cross = sum(layer.src_attn.cache_bytes(frames) for layer in decoder.decoders)
    measured_self = sum(cache_nbytes(cache) for cache in state.caches)
    measured_cross = sum(cache_nbytes(memory.cache) for memory in state.memories)
    if (measured_self, measured_cross) != (analytic_self, analytic_cross):
        raise RuntimeError(
            f"measured cache bytes ({measured_self}, {measured_cross}) differ from analytic "
            f"({analytic_self}, {analytic_cross})"
        )
    return {
        "tokens": tokens,
        "frames": frames,
        "self_bytes": analytic_self,
        "cross_bytes": analytic_cross,
        "self_bytes_per_token": analytic_self / tokens,
        "cross_bytes_per_frame": analytic_cross / frames,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.disable(logging.WARNING)  # the search warns that every run reaches maxlen: it must
    decoders = build_decoders(args)
    ctc = CTC(args.vocab, args.d_model).eval()
    for decoder in decoders.values():  # warm-up
        decode(decoder, ctc, torch.randn(20, args.d_model), 3, args)

    runs, caches = [], {}
    for seconds in args.seconds:
        frames = round(seconds * args.frames_per_second)
        steps = round(seconds * args.tokens_per_second)
        encoder_out = torch.randn(frames, args.d_model)
        timing, best = {}, {}
        for name, decoder in decoders.items():
            results = [decode(decoder, ctc, encoder_out, steps, args) for _ in range(args.repeats)]
            timing[name] = min(t for t, _ in results)
            best[name] = results[0][1]
            if name != "stock":
                caches.setdefault(name, []).append(cache_sizes(decoder, best[name], frames))
        run = {"seconds": seconds, "frames": frames, "steps": steps, "time_s": timing}
        run["speedup"] = {n: timing["stock"] / t for n, t in timing.items() if n != "stock"}
        if "mha" in best:
            run["mha_same_best_as_stock"] = best["mha"].yseq.tolist() == best["stock"].yseq.tolist()
        runs.append(run)
    report = {
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "variants": {name: VARIANTS[name] for name in args.variants},
        "decoding": runs,
        "cache": caches,
    }
    print_tables(report)
    print()
    write_report(args.output, report)
    return report


def print_tables(report: dict) -> None:
    config = report["config"]
    print(
        f"BatchBeamSearch, beam {config['beam']}, CTC weight {config['ctc_weight']}, "
        f"d_model {config['d_model']}, {config['layers']} layers, vocab {config['vocab']}, "
        f"{report['machine']['torch_threads']} torch threads"
    )
    names = [n for n in report["decoding"][0]["time_s"] if n != "stock"]
    header = f"{'speech':>7} {'frames':>6} {'steps':>5} {'stock s':>8}" + "".join(
        f" {n + ' s':>9} {'x':>5}" for n in names
    )
    print(header + "    (x: speedup over stock)")
    for run in report["decoding"]:
        row = f"{run['seconds']:>6.0f}s {run['frames']:>6} {run['steps']:>5}"
        row += f" {run['time_s']['stock']:>8.2f}"
        for name in names:
            row += f" {run['time_s'][name]:>9.2f} {run['speedup'][name]:>5.1f}"
        print(row)
    print("\ncache per hypothesis, all layers, float32, at the longest utterance")
    print(f"{'variant':>8} {'self B/token':>13} {'vs mha':>7} {'cross B/frame':>14} {'vs mha':>7}")
    longest = {name: sizes[-1] for name, sizes in report["cache"].items()}
    base = longest.get("mha")

    def versus_mha(sizes: dict, key: str) -> str:
        return f"{sizes[key] / base[key]:.3f}" if base else "-"

    for name, sizes in longest.items():
        print(
            f"{name:>8} {sizes['self_bytes_per_token']:>13.0f}"
            f" {versus_mha(sizes, 'self_bytes_per_token'):>7}"
            f" {sizes['cross_bytes_per_frame']:>14.0f}"
            f" {versus_mha(sizes, 'cross_bytes_per_frame'):>7}"
        )
    if "linear" in longest:
        print("(linear attention keeps a fixed-size state: its bytes per token fall with length)")


if __name__ == "__main__":
    main()
