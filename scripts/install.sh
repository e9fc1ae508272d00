#!/bin/sh
# Install medinv into a Python environment: the one recipe that `make install` and the
# Dockerfile share, so a development environment and the image get the package the same way.
#
# Usage: scripts/install.sh PYTHON [--torch SPEC] [--dev] [--editable]
#
#   PYTHON        the interpreter whose environment receives the package (.venv/bin/python)
#   --torch SPEC  install this torch first and on its own (e.g. torch==2.13.0), so that the
#                 package's torch>=2.8 is already satisfied and pip never swaps in another
#                 build; without it the environment's torch is kept (the CUDA base image's)
#   --dev         with the dev extra (tests, lint, references) and fastMRI, the reference
#                 the k-space and metric tests compare with; fastMRI's declared requirements
#                 would replace torch, so it is installed without them (what it imports
#                 comes with the dev extra)
#   --editable    the package in editable mode (a working copy); else a regular install
set -eu

usage="usage: $0 PYTHON [--torch SPEC] [--dev] [--editable]"
if [ "$#" -lt 1 ]; then
    echo "$usage" >&2
    exit 2
fi
python=$1
shift
torch=
extras=
editable=no
while [ "$#" -gt 0 ]; do
    case $1 in
        --torch)
            [ "$#" -ge 2 ] || { echo "$usage" >&2; exit 2; }
            torch=$2
            shift 2
            ;;
        --dev) extras="[dev]"; shift ;;
        --editable) editable=yes; shift ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
install() { "$python" -m pip install "$@"; }

if [ -n "$torch" ]; then
    install "$torch"
fi
if [ "$editable" = yes ]; then
    install -e "$root$extras"
else
    install "$root$extras"
fi
if [ -n "$extras" ]; then
    install --no-deps fastmri==0.3.0
fi
