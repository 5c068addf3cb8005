#!/usr/bin/env bash
# The former name of the torch 1.11 start script, kept so that existing commands work: the same
# as ./start-container_diffiner.sh --recipe torch1.11 (which takes every option; see its --help).
exec "$(dirname "${BASH_SOURCE[0]}")/start-container_diffiner.sh" --recipe torch1.11 "$@"
