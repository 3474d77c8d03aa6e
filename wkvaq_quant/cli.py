"""Command-line flags -> RunConfig. argparse lives here and nowhere else."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import A_DTYPES, KV_METHODS, RESIDUAL_MODES, W_DTYPES

from .plan import KV_ZERO_POINTS, QuantPlan
from .data import CALIB_DATASETS, EVAL_DATASETS
from .devices import DEVICE_MAPS
from .eval.lm_eval import LMEvalSettings
from .mix_bits import load_quant_config
from .models import DTYPES, EMBEDDED_MODEL
from .run import ATTN_IMPLEMENTATIONS, DEVICES, RunConfig
from .weights.algo import CalibConfig, WeightAlgo
from .weights.awq.settings import AWQ_SEARCH_DTYPES, SEARCH_DTYPE_HELP, AwqSearchConfig
from .weights.registry import get_weight_algo, method_to_algo, weight_algo_names
from .weights.blocks import NEXT_INPUTS
from .weights.gptq import GptqConfig

__all__ = ["build_parser", "parse_args", "parse_config", "add_calib_args", "add_quant_args", "add_lm_eval_args",
           "add_weight_algo_args", "explicit_flags", "plan_from_args", "weight_algo_from_args"]


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {value}")
        return value

    return parse


def add_calib_args(parser: argparse.ArgumentParser) -> None:
    """Calibration-data flags shared by the weight algorithms (AWQ, GPTQ)."""
    g = parser.add_argument_group("calibration data")
    g.add_argument("--calib_dataset", default="wiki_sample", choices=CALIB_DATASETS,
                   help="corpus whose calibration split (disjoint from evaluation) is sampled")
    g.add_argument("--n_calib", type=_positive_int("--n_calib"), default=128, help="number of calibration windows")
    g.add_argument("--calib_seq_len", type=_positive_int("--calib_seq_len"), default=512,
                   help="tokens per calibration window")
    g.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


def add_weight_algo_args(parser: argparse.ArgumentParser) -> None:
    """--weight_algo and GPTQ's flags (calibration data: add_calib_args)."""
    g = parser.add_argument_group("weight algorithm")
    g.add_argument("--weight_algo", default="rtn", choices=weight_algo_names(),
                   help="rtn: round to nearest; gptq: GPTQ; awq: AWQ's scale and clip search, then round to nearest "
                        "(gptq and awq run on the calibration windows before evaluation)")
    g.add_argument("--percdamp", type=float, default=GptqConfig.percdamp,
                   help="GPTQ dampening: this fraction of the mean of diag(H) is added to the diagonal")
    g.add_argument("--act_order", action="store_true", help="GPTQ: columns in order of decreasing diag(H)")
    g.add_argument("--static_groups", action="store_true",
                   help="GPTQ: group parameters from the original weights (with --act_order: each column keeps "
                        "its own group's)")
    g.add_argument("--gptq_next_inputs", default="quantized", choices=NEXT_INPUTS,
                   help="what the next block sees: the quantized block's outputs or the full-precision block's")
    g.add_argument("--gptq_single_pass", action="store_true",
                   help="GPTQ: one forward of each block, paused at each true-sequential group while it is "
                        "quantized, instead of one forward per group (the same weights in about half the time; "
                        "holds every calibration batch's activations inside the block in memory)")
    g.add_argument("--n_grid", type=_positive_int("--n_grid"), default=AwqSearchConfig.n_grid,
                   help="AWQ: grid points of the scale and clip searches")
    g.add_argument("--search_dtype", default="model", choices=list(AWQ_SEARCH_DTYPES),
                   help=f"AWQ: {SEARCH_DTYPE_HELP}")
    g.add_argument("--awq_weight_only_search", action="store_true",
                   help="AWQ with quantized activations (--a_bits, or an llmc act section): search the scales and "
                        "clips on full-precision inputs (default: on the quantized inputs, as llmc does)")
    g.add_argument("--layer_wise", action="store_true",
                   help="quantize the checkpoint's safetensors shards one decoder block at a time into --save_quant "
                        "(resumable) and stop; evaluate the result with --model DIR")
    g.add_argument("--save_quant", default=None, help="output directory of --layer_wise")
    g.add_argument("--offload_activations", action="store_true",
                   help="keep activations in files, one batch in memory at a time: with --layer_wise and GPTQ / AWQ "
                        "the calibration activations (under --save_quant); with --stream_blocks the windows' hidden "
                        "states (next to the result file; a killed run resumes after its last finished block)")


def weight_algo_from_args(args: argparse.Namespace, name: str) -> WeightAlgo:
    """The WeightAlgo `name` with the settings of parsed add_weight_algo_args / add_calib_args flags."""
    return WeightAlgo(name=name, awq=AwqSearchConfig(n_grid=args.n_grid, search_dtype=args.search_dtype,
                                                     weight_only_search=args.awq_weight_only_search),
                      gptq=GptqConfig(percdamp=args.percdamp, act_order=args.act_order,
                                                 static_groups=args.static_groups, next_inputs=args.gptq_next_inputs,
                                                 single_pass=args.gptq_single_pass),
                      calib=CalibConfig(dataset=args.calib_dataset, n_samples=args.n_calib, seq_len=args.calib_seq_len,
                                        seed=args.seed))


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    """P3-LLM's quantization flags (16 bits = off, group size -1 = whole row)."""
    g = parser.add_argument_group("quantization (P3-LLM flags; 16 bits = off)")
    for t, what, groups in (
        ("w", "decoder Linear weights (RTN)", "input channels per group (-1 = whole output row)"),
        ("a", "inputs of the decoder Linears, per token", "channels per group (-1 = whole token)"),
        ("q", "queries after RoPE, FP8 per (token, head)", "channels per group within a head (-1 = head_dim)"),
        ("k", "keys", "KTVT: channels per group over heads*head_dim (-1 = whole token); KCVT: tokens per group"),
        ("v", "values, per token", "channels per group over heads*head_dim (-1 = whole token)"),
    ):
        g.add_argument(f"--{t}_bits", type=int, default=16, help=f"bits of the {what}")
        g.add_argument(f"--{t}_group_size", type=int, default=-1, help=groups)
    g.add_argument("--p_bits", type=int, default=16, help="attention probabilities: 8 (E4M4) or 12 (E5M7)")
    g.add_argument("--w_dtype", default="int", choices=W_DTYPES, help="weight format")
    g.add_argument("--a_dtype", default="fp8_e4m3", choices=A_DTYPES, help="activation format")
    g.add_argument("--kv_quant_method", default="KTVT", choices=KV_METHODS,
                   help="KTVT: K and V per token; KCVT: K per channel over token groups, V per token")
    g.add_argument("--kv_zero_point", default="int", choices=KV_ZERO_POINTS,
                   help="zero point of per-token K (KTVT) and V: int (P3-LLM: an integer code offset) or float "
                        "(KIVI: the group minimum); KCVT's per-channel keys always use the float one")
    g.add_argument("--kv_residual_len", type=int, default=None,
                   help="newest K/V tokens kept in full precision, with the query and P against them (default: "
                        f"{DEFAULT_RESIDUAL['KTVT']} with KTVT, as P3-LLM; {DEFAULT_RESIDUAL['KCVT']} with KCVT, whose "
                        "token groups need a multiple of --k_group_size)")
    g.add_argument("--kv_residual_mode", default="last", choices=RESIDUAL_MODES,
                   help="last: the last R positions of the sequence are full precision for every query (P3-LLM); "
                        "per_query: each query reads its own R newest tokens in full precision (a decoder's view)")
    g.add_argument("--apply_k_scale", action="store_true", help="per-channel key smoothing by max |K|")
    g.add_argument("--apply_k_bias", action="store_true", help="subtract the per-channel key mean (added back)")
    g.add_argument("--k_quant_post_rope", action="store_true", help="quantize keys after RoPE (default before)")
    g.add_argument("--kv_quant_post_attn", action="store_true",
                   help="the prompt attends in full precision; only the KV cache read by later tokens is quantized")
    g.add_argument("--awq_model_path_lp", default=None,
                   help="load the weights of a fake-quantized checkpoint (state-dict file or safetensors directory) "
                        "over the model's before quantizing")
    g.add_argument("--no_fold_v_scale", dest="fold_v_scale", action="store_false",
                   help="with --p_bits and --v_bits: quantize P itself instead of P times V's per-token scale")
    g.add_argument("--config", default=None,
                   help="llmc-style YAML (quant: method, weight, act, mix_bits): per-layer settings refining the flags")
    g.add_argument("--show_plan", action="store_true",
                   help="print the resolved block x layer table of W/A (and KV) settings and stop")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The flags given on the command line (dest -> value), defaults left out."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def add_lm_eval_args(parser: argparse.ArgumentParser) -> None:
    """lm-eval tasks on the quantized model (scores go into the same result file)."""
    g = parser.add_argument_group("lm-eval tasks")
    g.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag, or the "
                   "offline wkvaq_wiki_sample_ppl,wkvaq_wiki_sample_mc (lm-evaluation-harness/)")
    g.add_argument("--limit", type=float, default=None, help="documents per task (>= 1) or a fraction (< 1)")
    g.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    g.add_argument("--apply_chat_template", action="store_true", help="wrap prompts in the tokenizer's chat template")


def lm_eval_from_args(args: argparse.Namespace) -> LMEvalSettings:
    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    return LMEvalSettings(tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                          apply_chat_template=args.apply_chat_template, batch_size=args.batch_size)


DEFAULT_RESIDUAL = {"KTVT": 1, "KCVT": 0}
"""--kv_residual_len when not given: P3-LLM's 1 with KTVT; 0 with KCVT (P3-LLM's 1 fails there: the
tokens before the residual must fill whole token groups)."""
QUANT_FLAGS = ("w_bits", "a_bits", "q_bits", "k_bits", "v_bits", "p_bits", "w_group_size", "a_group_size",
               "q_group_size", "k_group_size", "v_group_size", "w_dtype", "a_dtype", "kv_quant_method",
               "kv_residual_len", "kv_residual_mode", "apply_k_scale", "apply_k_bias", "k_quant_post_rope",
               "kv_quant_post_attn", "fold_v_scale", "kv_zero_point")
"""Flag dests of add_quant_args (the parameters of QuantPlan.from_flags)."""


def plan_from_args(args: argparse.Namespace) -> QuantPlan:
    """The QuantPlan of parsed `add_quant_args` flags (raises ValueError naming the flag)."""
    flags = {n: getattr(args, n) for n in QUANT_FLAGS}
    if flags["kv_residual_len"] is None:
        flags["kv_residual_len"] = DEFAULT_RESIDUAL.get(flags["kv_quant_method"], 0)
    return QuantPlan.from_flags(**flags)


def _no_residual_without_attention(plan: QuantPlan) -> QuantPlan:
    """Residual tokens matter only where the attention quantizes something; elsewhere R is 0, so
    one computation has one result name."""
    if plan.kv.residual_len and not plan.quantizes_attention:
        return dataclasses.replace(plan, kv=dataclasses.replace(plan.kv, residual_len=0))
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="main.py",
        description="Fake-quantize a Llama/Mistral model and measure perplexity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model_name", dest="model", default=EMBEDDED_MODEL,
                   help="registry short name (see wkvaq_quant/models.py), local checkpoint directory, or hub id "
                        "(--model_name: P3-LLM's spelling)")
    g.add_argument("--use_fp16", action="store_true",
                   help="P3-LLM's baseline: the unquantized model in float16, whatever the quantization flags say "
                        "(they are ignored, and named); on CPU float16 runs through PyTorch's slower CPU kernels")
    g.add_argument("--device", default="cpu", choices=DEVICES)
    g.add_argument("--dtype", default="float32", choices=list(DTYPES))
    g.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    g.add_argument("--trust_remote_code", action="store_true", help="allow custom modeling code from the hub")
    g = p.add_argument_group("evaluation")
    g.add_argument("--datasets", default=None,
                   help=f"comma-separated list of {', '.join(EVAL_DATASETS)} (default wiki_sample; none with --tasks)")
    g.add_argument("--seq_len", type=int, default=2048, help="tokens per evaluation window")
    g.add_argument("--n_windows", type=int, default=None, help="evaluate only the first N windows")
    g.add_argument("--batch_size", type=int, default=1, help="windows (and lm-eval requests) per forward pass")
    g.add_argument("--data_dir", default=None,
                   help="local copies of wikitext2/c4 in their original formats (or $WKVAQ_DATA_DIR)")
    g.add_argument("--stream_blocks", action="store_true",
                   help="perplexity with one decoder block in memory at a time, read from the checkpoint's "
                        "safetensors shards (a model larger than RAM or GPU memory); same numbers as in memory")
    g.add_argument("--device_map", default=None,
                   help=f"a whole model across GPUs (accelerate): {', '.join(DEVICE_MAPS)}, or a JSON object "
                        "{module: device} inline or in a .json file; needs --device cuda")
    g.add_argument("--max_memory", default=None,
                   help="with --device_map: memory per device, e.g. 0=40GiB,1=40GiB,cpu=100GiB")
    add_lm_eval_args(p)
    add_quant_args(p)
    add_weight_algo_args(p)
    add_calib_args(p)
    g = p.add_argument_group("results")
    g.add_argument("--results_dir", "--output_dir", dest="results_dir", default="results",
                   help="results/<model>/<config-slug>.json (--output_dir: P3-LLM's spelling)")
    g.add_argument("--overwrite", action="store_true", help="recompute even if a result exists")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--print_result_path", action="store_true",
                   help="print 'done PATH' or 'todo PATH' for this setting's result file and exit (loads nothing)")
    return p


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse flags into a validated RunConfig; bad values exit with the flag's name."""
    return parse_args(argv)[1]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, RunConfig]:
    """(parsed flags, validated RunConfig); bad values exit with the flag's name."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args, _config(args, argv)
    except ValueError as err:
        parser.error(str(err))


DATASET_ALIASES = {"wikitext": "wikitext2"}
"""P3-LLM's dataset names -> ours."""


def _use_fp16(args: argparse.Namespace, argv: list[str] | None) -> None:
    """--use_fp16 (P3-LLM): the unquantized model in float16. Quantization flags are ignored, as
    P3-LLM does, and named on stderr; a contradicting --dtype is refused."""
    explicit = explicit_flags(build_parser(), argv)
    if explicit.get("dtype", "float16") != "float16":
        raise ValueError(f"--use_fp16 evaluates in float16, but --dtype {explicit['dtype']} was given; "
                         f"allowed: --use_fp16 alone, or --dtype {explicit['dtype']} without --use_fp16")
    ignored = [n for n in (*QUANT_FLAGS, "config", "weight_algo", "awq_model_path_lp") if n in explicit]
    if ignored:
        print(f"[wkvaq] note: --use_fp16 evaluates the unquantized model; ignoring "
              f"{', '.join('--' + n for n in ignored)} (as P3-LLM does)", file=sys.stderr)
    defaults = build_parser().parse_args([])
    for n in (*QUANT_FLAGS, "config", "weight_algo", "awq_model_path_lp"):
        setattr(args, n, getattr(defaults, n))
    args.dtype = "float16"
    if args.device == "cpu":
        print("[wkvaq] note: --use_fp16 on CPU: float16 runs through PyTorch's CPU kernels (slower than float32)",
              file=sys.stderr)


def _config(args: argparse.Namespace, argv: list[str] | None) -> RunConfig:
    if args.use_fp16:
        _use_fp16(args, argv)
    plan, method = plan_from_args(args), get_weight_algo(args.weight_algo).method
    if args.config:
        quant = load_quant_config(args.config)
        explicit = explicit_flags(build_parser(), argv)
        if quant.method != "RTN":
            if "weight_algo" in explicit and method != quant.method:
                raise ValueError(f"--weight_algo {args.weight_algo} contradicts quant.method: {quant.method} in "
                                 f"{args.config}; allowed: --weight_algo {method_to_algo(quant.method)} or no --weight_algo")
            method = quant.method
        plan = quant.apply(plan, explicit)
    plan = _no_residual_without_attention(plan)
    return RunConfig(
        model=args.model,
        datasets=[DATASET_ALIASES.get(d.strip(), d.strip()) for d in (
            args.datasets if args.datasets is not None else "" if args.tasks else "wiki_sample").split(",")
            if d.strip()],
        seq_len=args.seq_len,
        n_windows=args.n_windows,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        data_dir=args.data_dir,
        results_dir=args.results_dir,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        plan=plan,
        awq_model_path_lp=args.awq_model_path_lp,
        config_file=args.config,
        weight_method=method,
        show_plan=args.show_plan,
        lm_eval=lm_eval_from_args(args),
        weight_algo=weight_algo_from_args(args, method_to_algo(method)),
        layer_wise=args.layer_wise,
        save_quant=args.save_quant,
        offload_activations=args.offload_activations,
        stream_blocks=args.stream_blocks,
        device_map=args.device_map,
        max_memory=args.max_memory,
    )
