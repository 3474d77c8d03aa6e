"""wkvaq entry point: flags -> RunConfig -> run -> results/<model>/<config-slug>.json."""

from __future__ import annotations

import json
import sys

from wkvaq_quant.cli import parse_args
from wkvaq_quant.run import format_table, result_status, run, show_plan
from wkvaq_quant.userfiles import run_cli
from wkvaq_quant.layerwise_run import run_layer_wise


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)

    def body() -> int:
        if cfg.show_plan:
            print(show_plan(cfg))
            return 0
        if args.print_result_path:
            path, done = result_status(cfg)
            print(f"{'done' if done else 'todo'} {path}")
            return 0
        if cfg.layer_wise:
            print(json.dumps(run_layer_wise(cfg), indent=1))
            return 0
        print(format_table(run(cfg)))
        return 0

    return run_cli(body, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
