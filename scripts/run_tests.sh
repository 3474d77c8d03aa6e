#!/usr/bin/env bash
# Install the test dependencies and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/run_tests.sh -m "not real_model"` skips the embedded-model tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
WKVAQ_EXTRAS="test" bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest "$@"
