#!/bin/bash
# Does the CPU kernel build once in a fresh cache, whatever PATH says and with two processes at once?
# Prints the binary's modification time after each step (one value throughout = one build) and the
# number of ninja log entries (3 = one build: two compiles and a link); then the same venv through a
# link, which has its own folder and leaves the first one's binary alone.
#     bash eval/kernel_rebuilds.sh        # from the checkout, with its .venv (pip's ninja in .venv/bin)
SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}; cd "$SRC"
export LLMBIN_KERNEL_CACHE=$(mktemp -d) PYTHONPATH=$SRC
PY=$SRC/.venv/bin/python
code='from llmbin.kernels.cpu import extension, build_directory; assert extension() is not None; import glob,os; so=glob.glob(str(build_directory()/"*.so"))[0]; print(os.stat(so).st_mtime_ns)'
echo "A venv bin on PATH: $(PATH=$SRC/.venv/bin:/usr/bin:/bin $PY -c "$code" 2>&1 | tail -1)"
echo "B system PATH only: $(PATH=/usr/bin:/bin $PY -c "$code" 2>&1 | tail -1)"
(PATH=/usr/bin:/bin $PY -c "$code" > $LLMBIN_KERNEL_CACHE/c.out 2>&1 &) ; PATH=$SRC/.venv/bin:/usr/bin:/bin $PY -c "$code" > $LLMBIN_KERNEL_CACHE/d.out 2>&1; sleep 3
echo "C concurrent system PATH: $(tail -1 $LLMBIN_KERNEL_CACHE/c.out)"
echo "D concurrent venv PATH: $(tail -1 $LLMBIN_KERNEL_CACHE/d.out)"
echo "ninja log entries: $(grep -vc '^#' $LLMBIN_KERNEL_CACHE/*/.ninja_log)"
# The same venv through a link: torch writes the linked paths into the command, so it gets its own
# folder (one more build, 3 more entries) and the first folder's binary is not rebuilt (same time as A).
ln -s "$(cd "$SRC/.venv" && pwd -P)" "$LLMBIN_KERNEL_CACHE/venv-link"
echo "E same venv through a link: $(PATH=/usr/bin:/bin $LLMBIN_KERNEL_CACHE/venv-link/bin/python -c "$code" 2>&1 | tail -1)"
echo "F venv's own path again: $(PATH=/usr/bin:/bin $PY -c "$code" 2>&1 | tail -1)"
echo "ninja log entries per folder: $(grep -vc '^#' $LLMBIN_KERNEL_CACHE/*/.ninja_log | sed 's|.*/\(torch[^/]*\)/.ninja_log|\1|' | tr '\n' ' ')"
rm -rf "$LLMBIN_KERNEL_CACHE"
