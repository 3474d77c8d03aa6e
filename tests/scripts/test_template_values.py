"""The sweep and AWQ templates check their variables before anything runs (a bad value is refused
naming the variable, exit 2) and never expand a value to file names. A stand-in PYTHON records every
call instead of running main.py, so nothing here loads a model."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
{ printf '%s\\x1f' "$@"; printf '\\n'; } >> "$FAKE_PY_LOG"
for a in "$@"; do [[ "$a" == --print_result_path ]] && echo "todo $FAKE_PY_LOG.json"; done
[[ "$1" == -c ]] && exit 1
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    """(environment with the stand-in PYTHON, a function returning the argument lists it was called with)."""
    py, log = tmp_path / "python", tmp_path / "calls.log"
    py.write_text(FAKE_PYTHON)
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    env = {"PYTHON": str(py), "FAKE_PY_LOG": str(log), "RESULTS_DIR": str(tmp_path / "results"),
           "SAVE_DIR": str(tmp_path / "quantized"), "CACHE_DIR": str(tmp_path / "cache"),
           "LOG_DIR": str(tmp_path / "logs")}

    def calls():
        if not log.is_file():
            return []
        return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]

    return env, calls


def _run(script, env, **over):
    full = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script)], cwd=ROOT, env={**full, **env, **over},
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


REFUSED = [
    ("test_ppl_template.sh", {"K_BITS_LIST": "*"}, "K_BITS_LIST: '*' is not allowed; allowed: positive integers"),
    ("test_ppl_template.sh", {"V_BITS_LIST": "4 ?"}, "V_BITS_LIST: '?' is not allowed"),
    ("test_ppl_template.sh", {"SWEEP_PARTS": "fp,kv"},
     "SWEEP_PARTS: 'fp,kv' is not allowed (lists are space-separated, not comma-separated); allowed: fp, kv, w, full"),
    ("test_ppl_template.sh", {"SWEEP_PARTS": "fp bogus"}, "SWEEP_PARTS: 'bogus' is not allowed; allowed: fp, kv, w, full"),
    ("test_ppl_template.sh", {"SWEEP_PARTS": " "}, "SWEEP_PARTS is empty; allowed: fp, kv, w, full"),
    ("test_ppl_template.sh", {"KV_QUANT_METHOD_LIST": "KTVT kcvt"}, "KV_QUANT_METHOD_LIST: 'kcvt' is not allowed; "
                                                                   "allowed: KTVT, KCVT"),
    ("test_ppl_template.sh", {"KV_RESIDUAL_LEN_LIST": "default -3"}, "KV_RESIDUAL_LEN_LIST: '-3' is not allowed"),
    ("test_ppl_template.sh", {"W_GROUP_SIZE_LIST": "128 0"}, "W_GROUP_SIZE_LIST: '0' is not allowed; allowed: -1 or"),
    ("test_ppl_template.sh", {"WQ_DTYPE": "int8"}, "WQ_DTYPE: 'int8' is not allowed; allowed: int, bitmod, fp4_e2m1"),
    ("test_ppl_template.sh", {"N_WINDOWS": "all"}, "N_WINDOWS: 'all' is not allowed"),
    ("test_ppl_post_rope_kv_quant.sh", {"K_BITS_LIST": "*"}, "K_BITS_LIST: '*' is not allowed"),
    ("test_lm_eval_template.sh", {"SWEEP_PARTS": "fp,full"}, "SWEEP_PARTS: 'fp,full' is not allowed"),
    ("test_lm_eval_template.sh", {"APPLY_CHAT_TEMPLATE": "yes"}, "APPLY_CHAT_TEMPLATE: 'yes' is not allowed; "
                                                                "allowed: on, off"),
    ("test_lm_eval_template.sh", {"LIMIT": "lots"}, "LIMIT: 'lots' is not allowed"),
    ("test_lm_eval_template.sh", {"TASKS": "arc_easy, piqa"}, "TASKS: 'arc_easy, piqa' is not allowed"),
    ("test_ppl_weight_algo_template.sh", {"W_BITS_LIST": "4 *"}, "W_BITS_LIST: '*' is not allowed"),
    ("test_ppl_weight_algo_template.sh", {"WEIGHT_ALGO_LIST": "rtn,gptq"}, "WEIGHT_ALGO_LIST: 'rtn,gptq' is not allowed"),
    ("test_ppl_weight_algo_template.sh", {"N_CALIB": "0"}, "N_CALIB: '0' is not allowed"),
    ("awq/run_awq.sh", {"W_BITS": "*"}, "W_BITS: '*' is not allowed; allowed: positive integers"),
    ("awq/run_awq.sh", {"N_GRID": "x"}, "N_GRID: 'x' is not allowed"),
    ("awq/run_awq_save_4b_model.sh", {"DOUBLE_QUANT": "yes"}, "DOUBLE_QUANT: 'yes' is not allowed; allowed: 0, 1"),
    ("awq/run_awq_save_4b_model.sh", {"GROUP_SIZES": "abc"}, "GROUP_SIZES: 'abc' is not allowed"),
]


@pytest.mark.parametrize("script,bad,message", REFUSED, ids=[f"{s}-{'-'.join(b)}" for s, b, _ in REFUSED])
def test_bad_values_are_refused_before_anything_runs(fake, tmp_path, script, bad, message):
    env, calls = fake
    code, out, err = _run(script, env, **bad)
    assert code == 2, out + err
    assert err.strip().splitlines() == [err.strip().splitlines()[0]] and message in err, err
    assert calls() == []  # neither main.py nor anything else ran
    assert not [p for p in tmp_path.iterdir() if p.name not in ("python", "calls.log")]  # nothing created


def test_glob_characters_reach_main_py_literally(fake):
    """A '*' in EXTRA_ARGS (or in TASKS) is passed to main.py as it is, not replaced by the names of
    the files it matches in the working directory (the repository root: wkvaq_quant, ...)."""
    env, calls = fake
    code, out, err = _run("test_ppl_template.sh", env, SWEEP_PARTS="fp", EXTRA_ARGS="--tasks wkvaq_*")
    assert code == 0, out + err
    main_calls = [c for c in calls() if c[0] == "main.py"]
    assert len(main_calls) == 2 and all(c[c.index("--tasks") + 1] == "wkvaq_*" for c in main_calls), main_calls
    code, out, err = _run("test_lm_eval_template.sh", env, SWEEP_PARTS="fp", TASKS="wkvaq_*", LIMIT="")
    assert code == 0, out + err
    last = [c for c in calls() if c[0] == "main.py"][-1]
    assert last[last.index("--tasks") + 1] == "wkvaq_*" and "--limit" not in last, last  # LIMIT="": all documents


def test_kv_and_weight_lists_run_every_combination(fake):
    """Valid lists still give every combination, each flag its own argument."""
    env, calls = fake
    code, out, err = _run("test_ppl_template.sh", env, SWEEP_PARTS="kv full", K_BITS_LIST="4 2", V_BITS_LIST="4",
                          KV_RESIDUAL_LEN_LIST="default 8", APPLY_K_SCALE="off", P_BITS_LIST="16")
    assert code == 0, out + err
    runs = [c for c in calls() if c[0] == "main.py" and "--no_progress" in c]
    assert len(runs) == 8, runs  # (K 4, 2) x (residual default, 8) for kv and for full
    kbits = sorted((c[c.index("--k_bits") + 1], "--kv_residual_len" in c, "--w_bits" in c) for c in runs)
    assert kbits == sorted((k, r, w) for k in ("4", "2") for r in (False, True) for w in (False, True))


def test_awq_models_are_never_globbed(fake):
    env, calls = fake
    code, out, err = _run("awq/run_awq.sh", env, MODELS="wkvaq_*", W_BITS="4")
    assert code == 0, out + err
    (call,) = calls()
    assert call[:2] == ["-m", "awq.entry"] and call[call.index("--model") + 1] == "wkvaq_*", call
