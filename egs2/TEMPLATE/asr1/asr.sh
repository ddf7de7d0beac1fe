#!/usr/bin/env bash
# Stage-based ASR recipe driver in the style of ESPnet's egs2/TEMPLATE/asr1/asr.sh.
# It runs from a recipe directory (egs2/<corpus>/asr1) through a symlink and drives ESPnet's own
# programs (through espnet_plugin.bin, so the plugin's classes are registered) from data to WER.
#
#   ./asr.sh --stage 3 --stop_stage 5 --asr_config conf/train_asr.yaml ...
#
# Stages:
#   1  data preparation (local/data.sh) into Kaldi-style dirs under data/
#   2  formatting into dump/raw/: every audio file decoded and checked, brought to --fs and mono,
#      durations, filters, speed perturbation
#   3  tokenization: sentencepiece model on the training text and ESPnet's token list
#   4  statistics collection (ESPnet --collect_stats, nj jobs, aggregated): global MVN and shapes
#   5  ASR training with ESPnet's trainer (CPU, GPU, multi-GPU, torchrun, slurm; resumes), or
#      fine-tuning of a trained model (--finetune_from), its attention first converted to MLA or
#      GQA if asked (--convert_args)
#   6  LM text (training transcripts once, --lm_train_text corpora, no evaluation sentence) and its
#      statistics in --nj jobs (only with --use_lm true)
#   7  LM training and its perplexity on every test set (only with --use_lm true)
#   8  decoding in --inference_nj parallel jobs, merged: utterances batched by the plugin's beam
#      search (--inference_batch_size, --inference_batch_frames), ESPnet's search rules and
#      results; with --lm_weights, the LM weight is chosen first on --lm_tune_set
#   9  scoring: WER and CER with S/D/I counts, alignments and result.json per test set
#   10 profiling of every decoded test set: decoder cache, time, real-time factor, peak memory
#   11 comparison report over every model under exp/: tables, CSV, plots, paired bootstrap
#   12 packing: the experiment into exp/asr_<tag>/packed/<tag>.zip, ESPnet's packed-model layout
#      with a model card (README.md), RESULTS.md, decode.yaml and checksums; refuses a stale or
#      unfinished experiment. Load it with python -m espnet_plugin.bin.transcribe --model <zip>
#   13 upload of that zip to the Hugging Face model repository --hf_repo (your own login)
#
# Every output records what it was made from (options, input file contents, config sections) in a
# .stamp file: a re-run skips what is up to date and redoes, saying why, what its inputs changed.
# A training made from other inputs is never replaced unasked: --overwrite true trains it again.
set -euo pipefail

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (${0##*/}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"; }
die() { log "ERROR: $*" >&2; exit 1; }

readonly min_stage=1 max_stage=13

# General options
stage=1                  # first stage to run
stop_stage=13            # last stage to run
python=python3           # the Python that has espnet_plugin installed
nj=4                     # parallel jobs for formatting and statistics collection
inference_nj=2           # parallel jobs for decoding
inference_batch_size=8   # utterances decoded at once by each job (results do not depend on it)
inference_batch_frames=0 # at most this many padded 10 ms frames a batch (0: no limit)
ngpu=0                   # GPUs per node (0: CPU)
num_nodes=1              # nodes for multi-node training
launcher=local           # local (ESPnet spawns --ngpu workers) | torchrun | slurm
nproc_per_node=          # torchrun processes per node (default: ngpu, or 1 on CPU)
node_rank=0              # torchrun: this node's rank
master_addr=localhost    # torchrun: rank 0's address
master_port=29500        # torchrun: rank 0's port
dumpdir=dump
expdir=exp
overwrite=false          # true: redo the selected stages' outputs although up to date (a training starts over)
dry_run=false            # true: say what the selected stages would make or redo, and do nothing

# Data options
local_data_opts=         # options passed to local/data.sh
train_set=               # training set name under data/
valid_set=               # validation set name under data/
test_sets=               # test set names under data/ (space separated)
fs=16k                   # sampling rate of the audio (16k, 8k, ...)
min_wav_duration=0.1     # seconds; shorter utterances are dropped from training, unusable in test sets
max_wav_duration=20      # seconds; longer utterances are dropped from training
speed_perturb_factors=   # e.g. "0.9 1.0 1.1"; empty: no speed perturbation
bad_audio=fail           # unreadable, empty or too short audio: fail (listing it) | drop (with a warning)
resample=true            # audio at another rate than --fs: true converts it (stage 2) | false refuses it

# Tokenization options
lang=en
token_type=bpe           # bpe | char
nbpe=300                 # sentencepiece vocabulary size
bpemode=unigram          # unigram | bpe
bpe_char_cover=1.0

# ASR options
asr_config=              # training YAML
asr_tag=                 # experiment name suffix (default: the config's name)
asr_args=                # extra arguments for asr_train
finetune_from=           # an exp dir: fine-tune its model (its config; --asr_config is not used)
convert_args=            # with --finetune_from: convert its attention first, e.g. "--target mla --kv_latent_dim 64"
finetune_epochs=4        # with --finetune_from: epochs (0: decode the starting model as it is)
finetune_lr_scale=0.1    # with --finetune_from: learning rate as a share of the starting model's
finetune_warmup_steps=100  # with --finetune_from: warm-up steps of the fine-tuning
utts_per_update=         # utterances per optimizer update on any number of GPUs (with --utts_per_gpu)
utts_per_gpu=            # utterances per GPU and step: batch_size and accum_grad follow from the GPUs
feats_normalize=global_mvn
inference_config=        # decoding YAML
inference_args=          # extra arguments for asr_inference (they name the decode dir)
inference_asr_model=valid.acc.ave.pth
profile_utts=            # stage 10 profiles at most this many utterances of each test set (empty: all)
profile_batch_sizes="1 8"  # stage 10 also decodes the longest utterances in batches of these sizes (empty: not)
memory_budget_mb=        # stage 10: the largest of those batches whose peak decoding memory is within this

# LM options
use_lm=false
lm_config=
lm_tag=
lm_args=
lm_train_text=           # LM text corpora besides the training transcripts (space separated, .gz allowed)
inference_lm=valid.loss.ave.pth
lm_weights=              # e.g. "0.1 0.3 0.5": each decodes --lm_tune_set, the best one the test sets
lm_tune_set=             # the set the LM weight is chosen on (default: --valid_set)

# Sharing options
hf_repo=                 # stage 13: the Hugging Face model repository, <user>/<name> (empty: no upload)
hf_private=false         # stage 13: a new repository is private

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; echo; \
    echo "Options (default):"; \
    grep -E '^[a-z_]+=.*#' "$0" | sed 's/^/  --/; s/=/ (/; s/ *#/) #/'; }

# ---- option parsing: --name value or --name=value for every variable declared above ----
command_line="$0 $*"
run_started=$(date '+%Y-%m-%dT%H:%M:%S')
declared_options=$(grep -oE '^[a-z_]+=' "$0" | tr -d '=')
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --*=*) name=${1%%=*}; value=${1#*=}; shift ;;
        --*) [ $# -ge 2 ] || die "option $1 needs a value"; name=$1; value=$2; shift 2 ;;
        *) die "unexpected argument '$1' (options are --name value; see --help)" ;;
    esac
    name=${name#--}; name=${name//-/_}
    grep -qx "${name}" <<<"${declared_options}" || die "unknown option --${name} (see --help)"
    printf -v "${name}" '%s' "${value}"
done

# ---- every check that needs no stage's output, before any stage runs ----
runs() { [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]; }
todo=0  # outputs a dry run would make
require() {  # require <path> <what makes it>
    [ -e "$1" ] && return 0
    [ "${dry_run}" = true ] || die "missing $1: it is made by $2; run that first"
    log "  (dry run) missing $1: made by $2"
}
one_of() {  # one_of <option name> <allowed values...>
    local name=$1 value=${!1}; shift
    [[ " $* " == *" ${value} "* ]] || die "--${name} '${value}': expected one of: $*"
}
for n in stage stop_stage; do
    [[ ${!n} =~ ^[0-9]+$ ]] && [ "${!n}" -ge ${min_stage} ] && [ "${!n}" -le ${max_stage} ] \
        || die "unknown --${n} ${!n}: stages are ${min_stage}..${max_stage} (see --help)"
done
[ "${stage}" -le "${stop_stage}" ] || die "--stage ${stage} is after --stop_stage ${stop_stage}"
for n in nj inference_nj inference_batch_size inference_batch_frames ngpu num_nodes; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "--${n} '${!n}': expected a whole number"
done
for n in nj inference_nj inference_batch_size; do
    [ "${!n}" -ge 1 ] || die "--${n} must be at least 1, got ${!n}"
done
one_of launcher local torchrun slurm
one_of token_type bpe char
one_of use_lm true false
one_of overwrite true false
one_of dry_run true false
one_of bad_audio fail drop
one_of resample true false
one_of hf_private true false
[ -n "${train_set}" ] && [ -n "${valid_set}" ] && [ -n "${test_sets}" ] \
    || die "--train_set, --valid_set and --test_sets are required"
[[ ${finetune_epochs} =~ ^[0-9]+$ ]] || die "--finetune_epochs '${finetune_epochs}': expected a whole number"
[ -z "${convert_args}" ] || [ -n "${finetune_from}" ] || die "--convert_args needs --finetune_from (the model to convert)"
if [ -n "${finetune_from}" ]; then
    asr_config=  # a fine-tuning trains its starting model's config (run.sh's default is not used)
    if runs 4 || runs 5; then
        require "${finetune_from}/config.yaml" "the training of the model to fine-tune"
        require "${finetune_from}/${inference_asr_model}" "the training of the model to fine-tune"
    fi
elif runs 4 || runs 5; then
    [ -n "${asr_config}" ] || die "--asr_config is required by stages 4 and 5"
    require "${asr_config}" "you (the --asr_config YAML)"
fi
if runs 8 && [ -n "${inference_config}" ]; then
    require "${inference_config}" "you (the --inference_config YAML)"
fi
if [ "${use_lm}" = true ] && { runs 6 || runs 7 || runs 8; }; then
    [ -n "${lm_config}" ] || die "--use_lm true needs --lm_config (the LM's training YAML)"
    require "${lm_config}" "you (the --lm_config YAML)"
    if runs 6 && ! runs 1; then
        for f in ${lm_train_text}; do require "${f}" "you (--lm_train_text)"; done
    fi
fi
[ -z "${lm_weights}" ] || [ "${use_lm}" = true ] || die "--lm_weights needs --use_lm true"
for w in ${lm_weights}; do
    [[ ${w} =~ ^[0-9]*\.?[0-9]+$ ]] || die "--lm_weights '${lm_weights}': '${w}' is not a weight"
done
lm_tune_set=${lm_tune_set:-${valid_set}}
if [ -n "${utts_per_update}${utts_per_gpu}" ]; then
    [[ ${utts_per_update} =~ ^[1-9][0-9]*$ ]] && [[ ${utts_per_gpu} =~ ^[1-9][0-9]*$ ]] \
        || die "--utts_per_update and --utts_per_gpu go together, as whole numbers"
fi

mkdir -p "${expdir}/logs"
run_log="${expdir}/logs/asr.sh.$(date '+%Y%m%dT%H%M%S').log"
exec > >(tee -a "${run_log}") 2> >(tee -a "${run_log}" >&2)
log "${command_line}"
log "log file: ${run_log}"

# ---- names derived from the options ----
[ -n "${speed_perturb_factors}" ] && sp_suffix=_sp || sp_suffix=
train_dump=${dumpdir}/raw/${train_set}${sp_suffix}
valid_dump=${dumpdir}/raw/${valid_set}
if [ "${token_type}" = bpe ]; then
    token_dir=data/${lang}_token_list/bpe_${bpemode}${nbpe}
    bpemodel=${token_dir}/bpe.model
else
    token_dir=data/${lang}_token_list/char
    bpemodel=none
fi
token_list=${token_dir}/tokens.txt
[ "${token_type}" = bpe ] && token_suffix=${token_type}${nbpe} || token_suffix=${token_type}
if [ -z "${asr_tag}" ] && [ -n "${finetune_from}" ]; then
    asr_tag=$(basename "${finetune_from}"); asr_tag=${asr_tag#asr_}_finetune
elif [ -z "${asr_tag}" ]; then
    [ -n "${asr_config}" ] && asr_tag=$(basename "${asr_config}" .yaml) || asr_tag=default
    asr_tag+=_raw_${lang}_${token_suffix}${sp_suffix}
fi
# Each frontend and sampling rate gets its own statistics, named after them; a fine-tuning
# normalises as its starting model was trained to (the statistics its config.yaml names).
asr_stats_dir=${expdir}/asr_stats_raw_${lang}_${token_suffix}${sp_suffix}
if [ -n "${finetune_from}" ] && [ -e "${finetune_from}/config.yaml" ]; then
    asr_stats_dir=$(${python} -c 'import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["normalize_conf"]["stats_file"])' "${finetune_from}/config.yaml")
    asr_stats_dir=${asr_stats_dir%/train/feats_stats.npz}
elif [ -n "${asr_config}" ] && [ -e "${asr_config}" ]; then
    asr_stats_dir+=_$(${python} -m espnet_plugin.recipe.stamp digest --option "fs=${fs}" \
        --config "${asr_config}:frontend,frontend_conf")
fi
asr_exp=${expdir}/asr_${asr_tag}
lm_stats_dir=${expdir}/lm_stats_${lang}_${token_suffix}
[ -z "${lm_tag}" ] && [ -n "${lm_config}" ] && lm_tag=$(basename "${lm_config}" .yaml)
lm_exp=${expdir}/lm_${lm_tag:-none}_${lang}_${token_suffix}
lm_dump=${dumpdir}/raw/lm
lm_text=${lm_dump}/train.txt

token_opts=(--token_type "${token_type}" --token_list "${token_list}" --bpemodel "${bpemodel}"
            --non_linguistic_symbols none --cleaner none --g2p none)
token_files=("${token_list}")
[ "${token_type}" = bpe ] && token_files+=("${bpemodel}")
data_opts() {  # data_opts <train|valid> <dump dir>
    echo "--$1_data_path_and_name_and_type $2/wav.scp,speech,sound" \
         "--$1_data_path_and_name_and_type $2/text,text,text"
}
file_opts() {  # file_opts <file>...: the --file arguments of a stamp
    local f
    for f in "$@"; do printf -- '--file\n%s\n' "${f}"; done
}
split_keys() {  # split_keys <scp> <n> <out prefix>: n key files <out prefix>.1 .. .n
    local n
    n=$(wc -l < "$1"); [ "$2" -lt "${n}" ] && n=$2
    cut -d' ' -f1 "$1" > "$3.all"
    split -n "l/${n}" -a 3 --numeric-suffixes=1 "$3.all" "$3."
    for f in "$3".[0-9][0-9][0-9]; do mv "$f" "$3.$((10#${f##*.}))"; done
    rm "$3.all"
    echo "${n}"
}
run_jobs() {  # run_jobs <n> <log prefix> <command with JOB>: n parallel jobs, fails if any fails
    local n=$1 prefix=$2 pids=() failed=0 i threads
    shift 2
    # Share the cores among the jobs: oversubscribed OpenMP threads spin and slow torch ~10x.
    threads=${OMP_NUM_THREADS:-$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))}
    for i in $(seq 1 "${n}"); do
        ( export OMP_NUM_THREADS=${threads}; "${@//JOB/${i}}" ) > "${prefix}.${i}.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do wait "${pids[$i]}" || { failed=1; log "job $((i + 1)) failed: see ${prefix}.$((i + 1)).log"; }; done
    [ "${failed}" = 0 ] || die "some jobs failed (logs: ${prefix}.*.log)"
}
add_vocabulary_size() {  # add_vocabulary_size <stats dir>: the text shapes ESPnet's batching reads
    local part n_tokens
    n_tokens=$(wc -l < "${token_list}")
    for part in train valid; do
        awk -v N="${n_tokens}" '{ print $0 "," N }' "$1/${part}/text_shape" \
            > "$1/${part}/text_shape.${token_type}"
    done
}

# ---- locks: one run at a time writes each output ----
# A run takes, before its first stage, the lock of everything its stages write: each data set
# (stages 1-2), the token list (3), the statistics (4), the experiment (5, 8-10), the LM (6-7),
# the report (11). A second run that would write the same stops at once, naming the run that
# holds it; runs that write disjoint outputs (run_study.sh --jobs N: one experiment each) go on
# side by side. flock's locks end with the processes that hold them, so a killed run leaves none.
lock_dir=${expdir}/locks
declare -A held_locks=()
take_lock() {  # take_lock <output it guards> <what it is>
    local file=${lock_dir}/${1//\//_}.lock fd holder
    [ -z "${held_locks[${file}]:-}" ] || return 0
    exec {fd}>>"${file}"
    if ! flock -n "${fd}"; then
        holder=$(cat "${file}" 2>/dev/null) || true
        die "another run is writing $2 ($1; lock ${file}): ${holder:-a run that has not said who it is}." \
            "Wait for it to end, or stop it; a run killed since never blocks"
    fi
    printf 'pid %s, started %s, command: %s\n' "$$" "${run_started}" "${command_line}" > "${file}"
    held_locks[${file}]=${fd}
}
if [ "${dry_run}" = false ]; then
    mkdir -p "${lock_dir}"
    if runs 1 || runs 2; then
        for dset in "${train_set}" "${valid_set}" ${test_sets}; do
            take_lock "data/${dset}" "data set ${dset} (data/ and ${dumpdir}/raw/)"
        done
    fi
    if runs 3; then take_lock "${token_dir}" "the token list"; fi
    if runs 4 && [ -z "${finetune_from}" ]; then take_lock "${asr_stats_dir}" "the statistics"; fi
    if runs 5 || runs 8 || runs 9 || runs 10 || runs 12 || runs 13; then
        take_lock "${asr_exp}" "the experiment"
    fi
    if [ "${use_lm}" = true ] && { runs 6 || runs 7; }; then take_lock "${lm_exp}" "the LM"; fi
    if runs 11; then take_lock "${expdir}/report" "the report"; fi
fi

# ---- stamps: what each output was made from ----
stamp() { ${python} -m espnet_plugin.recipe.stamp "$@"; }
needs_work() {  # needs_work <dir> <stamp inputs...>: true when <dir> must be (re)made; logs why
    local dir=$1 state
    shift
    if [ "${overwrite}" = true ]; then
        log "  ${dir}: making it again (--overwrite true)"
        return 0
    fi
    state=$(stamp check --dir "${dir}" "$@") || die "cannot check what ${dir} was made from"
    case "${state}" in
        current) log "  ${dir}: up to date"; return 1 ;;
        absent)
            [ -d "${dir}" ] && log "  ${dir}: no record of what it was made from; making it again" ;;
        *)
            log "  ${dir}: its inputs changed since it was made; making it again:"
            tail -n +2 <<<"${state}" | while IFS= read -r line; do log "    ${line}"; done ;;
    esac
    [ "${dry_run}" = true ] || return 0
    log "  (dry run) would make ${dir}"
    todo=$((todo + 1))
    return 1
}

# ---- 1: data preparation ----
if runs 1 && [ "${dry_run}" = true ]; then
    log "Stage 1: (dry run) would run local/data.sh ${local_data_opts} (it leaves identical data as it is)"
elif runs 1; then
    log "Stage 1: data preparation: local/data.sh ${local_data_opts}"
    require local/data.sh "the recipe (each recipe has its own local/data.sh)"
    data_sh_opts=()
    [ "${overwrite}" = true ] && data_sh_opts+=(--overwrite)
    # shellcheck disable=SC2086
    local/data.sh ${local_data_opts} "${data_sh_opts[@]}"
    for dset in "${train_set}" "${valid_set}" ${test_sets}; do
        require "data/${dset}/wav.scp" "local/data.sh (stage 1)"
    done
fi

# ---- 2: formatting ----
if runs 2; then
    log "Stage 2: formatting data/ into ${dumpdir}/raw/ (every audio file is decoded to check it)"
    for dset in "${train_set}" "${valid_set}" ${test_sets}; do
        require "data/${dset}/wav.scp" "stage 1 (data preparation)"
        opts=(--src "data/${dset}" --bad_audio "${bad_audio}" --fs "${fs}" --resample "${resample}")
        if [ "${dset}" = "${train_set}" ]; then
            out=${train_dump}
            opts+=(--min_dur "${min_wav_duration}" --max_dur "${max_wav_duration}")
            [ -n "${speed_perturb_factors}" ] && opts+=(--speed_perturb_factors "${speed_perturb_factors}")
        else
            out=${dumpdir}/raw/${dset}   # every utterance of an evaluation set, or an error
            opts+=(--min_audio_dur "${min_wav_duration}")
        fi
        mapfile -t inputs < <(file_opts "data/${dset}/"{wav.scp,text,utt2spk})
        inputs+=(--option "format_data=${opts[*]}")
        needs_work "${out}" "${inputs[@]}" || continue
        ${python} -m espnet_plugin.recipe.format_data "${opts[@]}" --nj "${nj}" --dst "${out}" --overwrite
        # The stamp records what was converted (not an input: a check does not compare it).
        notes=()
        if [ -e "${out}/converted" ]; then
            log "  ${out}: $(wc -l < "${out}/converted") utterance(s) converted to ${fs} mono (${out}/converted)"
            notes=(--note "converted=$(paste -sd ';' "${out}/converted")")
        fi
        stamp write --dir "${out}" "${inputs[@]}" "${notes[@]}"
    done
fi

# ---- 3: tokenization ----
if runs 3; then
    log "Stage 3: ${token_type} tokenization on ${train_dump}/text into ${token_dir}"
    require "${train_dump}/text" "stage 2 (formatting)"
    mapfile -t inputs < <(file_opts "${train_dump}/text")
    inputs+=(--option "token_type=${token_type}" --option "nbpe=${nbpe}"
             --option "bpemode=${bpemode}" --option "bpe_char_cover=${bpe_char_cover}")
    if needs_work "${token_dir}" "${inputs[@]}"; then
        rm -rf "${token_dir}"
        mkdir -p "${token_dir}"
        ${python} -m espnet_plugin.recipe.tokenizer --text "${train_dump}/text" \
            --token_type "${token_type}" --out_dir "${token_dir}" \
            --nbpe "${nbpe}" --bpemode "${bpemode}" --char_cover "${bpe_char_cover}"
        stamp write --dir "${token_dir}" "${inputs[@]}"
    fi
fi

# ---- 4: statistics ----
if runs 4 && [ -n "${finetune_from}" ]; then
    log "Stage 4: the statistics of ${finetune_from}: ${asr_stats_dir}"
elif runs 4; then
    log "Stage 4: statistics collection into ${asr_stats_dir}"
    for f in "${train_dump}/wav.scp" "${valid_dump}/wav.scp" "${token_list}"; do
        require "$f" "stages 2-3"
    done
    mapfile -t inputs < <(file_opts "${train_dump}/"{wav.scp,text} "${valid_dump}/"{wav.scp,text} "${token_files[@]}")
    inputs+=(--option "fs=${fs}")  # the frontend is in the folder's name
    if needs_work "${asr_stats_dir}" "${inputs[@]}"; then
        rm -rf "${asr_stats_dir}"
        logdir=${asr_stats_dir}/logdir
        mkdir -p "${logdir}"
        n=$(split_keys "${train_dump}/wav.scp" "${nj}" "${logdir}/train.scp")
        split_keys "${valid_dump}/wav.scp" "${n}" "${logdir}/valid.scp" > /dev/null
        nv=$(ls "${logdir}"/valid.scp.* | wc -l)
        [ "${nv}" -lt "${n}" ] && n=${nv}
        log "  ${n} jobs, logs in ${logdir}/stats.*.log"
        # shellcheck disable=SC2046
        run_jobs "${n}" "${logdir}/stats" ${python} -m espnet_plugin.bin.asr_train \
            --collect_stats true --use_preprocessor true "${token_opts[@]}" \
            $(data_opts train "${train_dump}") $(data_opts valid "${valid_dump}") \
            --train_shape_file "${logdir}/train.scp.JOB" --valid_shape_file "${logdir}/valid.scp.JOB" \
            --output_dir "${logdir}/stats.JOB" --config "${asr_config}" --frontend_conf "fs=${fs}"
        inputs_dirs=()
        for i in $(seq 1 "${n}"); do inputs_dirs+=(--input_dir "${logdir}/stats.${i}"); done
        ${python} -m espnet2.bin.aggregate_stats_dirs "${inputs_dirs[@]}" --output_dir "${asr_stats_dir}"
        add_vocabulary_size "${asr_stats_dir}"
        stamp write --dir "${asr_stats_dir}" "${inputs[@]}"
    fi
fi

# ---- 5: training ----
train_command() {  # the launcher-specific command that runs $1 (a python module)
    local module=$1
    case "${launcher}" in
        local)
            echo "${python} -m ${module} --ngpu ${ngpu} --multiprocessing_distributed true" ;;
        torchrun)
            local per_node=${nproc_per_node:-$(( ngpu > 0 ? ngpu : 1 ))} backend=gloo
            [ "${ngpu}" -gt 0 ] && backend=nccl
            echo "${python} -m torch.distributed.run --nnodes ${num_nodes} --node_rank ${node_rank}" \
                 "--nproc_per_node ${per_node} --master_addr ${master_addr} --master_port ${master_port}" \
                 "-m ${module} --ngpu $(( ngpu > 0 ? 1 : 0 )) --multiprocessing_distributed false" \
                 "--dist_backend ${backend}" ;;
        slurm)
            echo "srun --nodes ${num_nodes} --ntasks-per-node 1 ${python} -m ${module} --ngpu ${ngpu}" \
                 "--multiprocessing_distributed true --dist_launcher slurm" \
                 "--dist_init_method file://$(pwd)/${expdir}/.dist_init_$$" ;;
    esac
}
training_workers() {  # the number of training processes the launcher starts
    case "${launcher}" in
        torchrun) echo $(( ${nproc_per_node:-$(( ngpu > 0 ? ngpu : 1 ))} * num_nodes )) ;;
        *) echo $(( (ngpu > 0 ? ngpu : 1) * num_nodes )) ;;
    esac
}
batch_opts() {  # ESPnet's batch options that keep --utts_per_update whatever the GPU count
    [ -n "${utts_per_update}" ] || return 0
    local per_step=$(( utts_per_gpu * $(training_workers) ))
    (( utts_per_update % per_step == 0 )) || die "--utts_per_update ${utts_per_update} is not a" \
        "multiple of --utts_per_gpu ${utts_per_gpu} x $(training_workers) training processes"
    echo "--batch_type sorted --batch_size ${per_step} --accum_grad $(( utts_per_update / per_step ))"
}
discard_for_overwrite() {  # discard_for_overwrite <exp dir>: --overwrite true trains it again
    if [ "${overwrite}" = true ] && [ -e "$1" ]; then
        log "  $1: discarding it to train again (--overwrite true)"
        rm -rf "$1"
    fi
}
# needs_training <exp dir> <final model> <stamp inputs...>: true when the training must run (it
# resumes from its checkpoint if it was interrupted); it refuses to mix a training with inputs
# other than those it began from.
needs_training() {
    local exp=$1 final=$2 state
    shift 2
    state=$(stamp check --dir "${exp}" "$@") || die "cannot check what ${exp} was made from"
    if [ "${state}" = current ] && [ -e "${final}" ]; then
        log "  ${exp}: trained, up to date"
        return 1
    fi
    if [ "${state}" = absent ] && compgen -G "${exp}/*.pth" > /dev/null; then
        die "${exp} holds a training with no record of what it was made from; train under another" \
            "--asr_tag (or --lm_tag), or pass --overwrite true to discard it and train again"
    fi
    if [ "${state%%$'\n'*}" = stale ]; then
        die "${exp} was trained from other inputs:"$'\n'"$(tail -n +2 <<<"${state}")"$'\n'"Train" \
            "under another --asr_tag (or --lm_tag) to keep both, or pass --overwrite true to" \
            "discard it and train again"
    fi
    if [ "${dry_run}" = true ]; then
        log "  (dry run) would train ${exp}"
        todo=$((todo + 1))
        return 1
    fi
    mkdir -p "${exp}"
    stamp write --dir "${exp}" "$@"   # before training: a resumed run must see the same inputs
}

if runs 5; then
    for f in "${asr_stats_dir}/train/feats_stats.npz" "${asr_stats_dir}/train/text_shape.${token_type}"; do
        require "$f" "stage 4 (statistics)"
    done
    [ "${dry_run}" = true ] || discard_for_overwrite "${asr_exp}"
    final_model=${asr_exp}/${inference_asr_model}
    mapfile -t inputs < <(file_opts "${train_dump}/"{wav.scp,text} "${valid_dump}/"{wav.scp,text} \
        "${token_files[@]}" "${asr_stats_dir}/train/feats_stats.npz")
    inputs+=(--option "asr_args=${asr_args}" --option "fs=${fs}" --option "normalize=${feats_normalize}")
    if [ -z "${finetune_from}" ]; then
        log "Stage 5: ASR training into ${asr_exp}"
        train_config=${asr_config}
        mapfile -t -O "${#inputs[@]}" inputs < <(file_opts "${train_config}")
        train_args=${asr_args}
    else
        log "Stage 5: fine-tuning ${finetune_from}/${inference_asr_model} into ${asr_exp}"
        start_config=${finetune_from}/config.yaml
        start_model=${finetune_from}/${inference_asr_model}
        if [ -n "${convert_args}" ]; then
            conversion=${asr_exp}/conversion
            mapfile -t conversion_inputs < <(file_opts "${start_config}" "${start_model}" "${valid_dump}/"{wav.scp,text})
            conversion_inputs+=(--option "convert_args=${convert_args}")
            if needs_work "${conversion}" "${conversion_inputs[@]}"; then
                rm -rf "${conversion}"
                mkdir -p "${asr_exp}"
                # shellcheck disable=SC2086
                ${python} -m espnet_plugin.bin.convert_attention --asr_train_config "${start_config}" \
                    --asr_model_file "${start_model}" --out_dir "${conversion}" \
                    --calib_data "${valid_dump}/wav.scp" --device "$( [ "${ngpu}" -gt 0 ] && echo cuda || echo cpu )" \
                    ${convert_args} | tee "${asr_exp}/conversion.log"
                stamp write --dir "${conversion}" "${conversion_inputs[@]}"
            fi
            start_config=${conversion}/config.yaml
            start_model=${conversion}/model.pth
        fi
        mapfile -t -O "${#inputs[@]}" inputs < <(file_opts "${start_config}" "${start_model}")
        inputs+=(--option "finetune_from=${finetune_from}" --option "convert_args=${convert_args}"
                 --option "finetune=${finetune_epochs} epochs, lr x ${finetune_lr_scale}, ${finetune_warmup_steps} warm-up steps")
        train_config=${asr_exp}/finetune.yaml
        train_args="--init_param ${start_model} ${asr_args}"
    fi
    inputs+=(--option "utts_per_update=${utts_per_update}" --option "utts_per_gpu=${utts_per_gpu}")
    # shellcheck disable=SC2046,SC2206
    train_cmd=($(train_command espnet_plugin.bin.asr_train)
        --use_preprocessor true "${token_opts[@]}"
        $(data_opts train "${train_dump}") $(data_opts valid "${valid_dump}")
        --train_shape_file "${asr_stats_dir}/train/speech_shape"
        --train_shape_file "${asr_stats_dir}/train/text_shape.${token_type}"
        --valid_shape_file "${asr_stats_dir}/valid/speech_shape"
        --valid_shape_file "${asr_stats_dir}/valid/text_shape.${token_type}"
        --resume true --fold_length 80000 --fold_length 150
        --frontend_conf "fs=${fs}" --normalize "${feats_normalize}"
        --normalize_conf "stats_file=${asr_stats_dir}/train/feats_stats.npz"
        --config "${train_config}" --output_dir "${asr_exp}" $(batch_opts) ${train_args})
    [ "${dry_run}" = true ] && log "  (dry run) the training command: ${train_cmd[*]}"
    if needs_training "${asr_exp}" "${final_model}" "${inputs[@]}"; then
        if [ -n "${finetune_from}" ] && [ "${finetune_epochs}" = 0 ]; then
            log "  --finetune_epochs 0: ${asr_exp} decodes ${start_model} as it is"
            cp "${start_config}" "${asr_exp}/config.yaml"
            cp "${start_model}" "${final_model}"
        else
            if [ -n "${finetune_from}" ]; then
                ${python} -m espnet_plugin.recipe.finetune_config --config "${start_config}" \
                    --epochs "${finetune_epochs}" --lr_scale "${finetune_lr_scale}" \
                    --warmup_steps "${finetune_warmup_steps}" --out "${train_config}"
            fi
            log "  launcher ${launcher}, ${ngpu} GPU(s) per node, ${num_nodes} node(s); log: ${asr_exp}/train.log"
            log "  an interrupted training resumes from ${asr_exp}/checkpoint.pth when this stage is re-run"
            "${train_cmd[@]}" >> "${asr_exp}/train.log" 2>&1 \
                || { tail -n 30 "${asr_exp}/train.log"; die "training failed: see ${asr_exp}/train.log"; }
        fi
        require "${final_model}" "ESPnet's trainer (checkpoint averaging at the end of training)"
        log "  done: ${final_model}"
    fi
fi

# ---- 6-7: language model ----
if [ "${use_lm}" = false ] && { runs 6 || runs 7; }; then
    log "Stages 6-7: skipped: no LM (--use_lm false)"
fi
eval_texts=()
for dset in "${valid_set}" ${test_sets}; do eval_texts+=("${dumpdir}/raw/${dset}/text"); done
if [ "${use_lm}" = true ] && runs 6; then
    log "Stage 6: LM text into ${lm_dump} and its statistics into ${lm_stats_dir}"
    require "data/${train_set}/text" "stage 1 (data preparation)"
    require "${token_list}" "stage 3 (tokenization)"
    [ "${token_type}" = char ] || require "${bpemodel}" "stage 3 (the ASR's BPE model tokenizes the LM text too)"
    for f in ${lm_train_text} "${eval_texts[@]}"; do require "${f}" "you (--lm_train_text) or stage 2"; done
    mapfile -t inputs < <(file_opts "data/${train_set}/text" ${lm_train_text} "${eval_texts[@]}")
    if needs_work "${lm_dump}" "${inputs[@]}"; then
        text_opts=()
        for f in ${lm_train_text}; do text_opts+=(--text "${f}"); done
        for f in "${eval_texts[@]}"; do text_opts+=(--exclude "${f}"); done
        ${python} -m espnet_plugin.recipe.lm_text --transcripts "data/${train_set}/text" \
            "${text_opts[@]}" --out "${lm_text}"
        stamp write --dir "${lm_dump}" "${inputs[@]}"
    fi
    mapfile -t inputs < <(file_opts "${lm_text}" "${valid_dump}/text" "${token_files[@]}")
    if needs_work "${lm_stats_dir}" "${inputs[@]}"; then
        rm -rf "${lm_stats_dir}"
        logdir=${lm_stats_dir}/logdir
        mkdir -p "${logdir}"
        # Each job reads its own part of the text (the LibriSpeech LM corpus is 4 GB).
        n=$(( $(wc -l < "${valid_dump}/text") < nj ? $(wc -l < "${valid_dump}/text") : nj ))
        split -n "l/${n}" -a 3 --numeric-suffixes=1 "${lm_text}" "${logdir}/train."
        split -n "l/${n}" -a 3 --numeric-suffixes=1 "${valid_dump}/text" "${logdir}/valid."
        for f in "${logdir}"/{train,valid}.[0-9][0-9][0-9]; do mv "$f" "${f%.*}.$((10#${f##*.})).txt"; done
        log "  ${n} jobs, logs in ${logdir}/stats.*.log"
        run_jobs "${n}" "${logdir}/stats" ${python} -m espnet_plugin.bin.lm_train \
            --collect_stats true --ngpu 0 "${token_opts[@]}" \
            --train_data_path_and_name_and_type "${logdir}/train.JOB.txt,text,text" \
            --valid_data_path_and_name_and_type "${logdir}/valid.JOB.txt,text,text" \
            --train_shape_file "${logdir}/train.JOB.txt" --valid_shape_file "${logdir}/valid.JOB.txt" \
            --config "${lm_config}" --output_dir "${logdir}/stats.JOB"
        inputs_dirs=()
        for i in $(seq 1 "${n}"); do inputs_dirs+=(--input_dir "${logdir}/stats.${i}"); done
        ${python} -m espnet2.bin.aggregate_stats_dirs "${inputs_dirs[@]}" --output_dir "${lm_stats_dir}"
        add_vocabulary_size "${lm_stats_dir}"
        stamp write --dir "${lm_stats_dir}" "${inputs[@]}"
    fi
fi
if [ "${use_lm}" = true ] && runs 7; then
    log "Stage 7: LM training into ${lm_exp}"
    require "${lm_stats_dir}/train/text_shape.${token_type}" "stage 6 (LM statistics)"
    [ "${dry_run}" = true ] || discard_for_overwrite "${lm_exp}"
    mapfile -t inputs < <(file_opts "${lm_config}" "${lm_text}" "${valid_dump}/text" "${token_files[@]}")
    inputs+=(--option "lm_args=${lm_args}")
    if needs_training "${lm_exp}" "${lm_exp}/${inference_lm}" "${inputs[@]}"; then
        # shellcheck disable=SC2046,SC2086
        $(train_command espnet_plugin.bin.lm_train) "${token_opts[@]}" \
            --train_data_path_and_name_and_type "${lm_text},text,text" \
            --valid_data_path_and_name_and_type "${valid_dump}/text,text,text" \
            --train_shape_file "${lm_stats_dir}/train/text_shape.${token_type}" \
            --valid_shape_file "${lm_stats_dir}/valid/text_shape.${token_type}" \
            --resume true --fold_length 150 --config "${lm_config}" --output_dir "${lm_exp}" ${lm_args} \
            >> "${lm_exp}/train.log" 2>&1 || die "LM training failed: see ${lm_exp}/train.log"
        require "${lm_exp}/${inference_lm}" "ESPnet's LM trainer"
    fi
    for dset in ${test_sets}; do
        dir=${lm_exp}/perplexity_${dset}
        mapfile -t inputs < <(file_opts "${lm_exp}/config.yaml" "${lm_exp}/${inference_lm}" "${dumpdir}/raw/${dset}/text")
        if needs_work "${dir}" "${inputs[@]}"; then
            ${python} -m espnet_plugin.bin.lm_calc_perplexity --ngpu "$(( ngpu > 0 ? 1 : 0 ))" \
                --data_path_and_name_and_type "${dumpdir}/raw/${dset}/text,text,text" \
                --train_config "${lm_exp}/config.yaml" --model_file "${lm_exp}/${inference_lm}" \
                --output_dir "${dir}" > "${dir}.log" 2>&1 || die "perplexity failed: see ${dir}.log"
            stamp write --dir "${dir}" "${inputs[@]}"
        fi
        if [ -e "${dir}/ppl" ]; then log "  ${dset}: perplexity $(cat "${dir}/ppl")"; fi
    done
fi

# ---- 8: decoding ----
packed_zip=${asr_exp}/packed/${asr_tag}.zip
decode_tag_of() {  # decode_tag_of <inference args>: the decode dir names the config, the options
    local tag                # given on top of it and the models
    tag=$( [ -n "${inference_config}" ] && basename "${inference_config}" .yaml || echo decode )
    [ -n "$1" ] && tag+=$(sed -e 's/--/_/g' -e 's/[ =]//g' <<<" $1")
    [ "${use_lm}" = true ] && tag+=_lm_${lm_tag:-none}_${inference_lm%.pth}
    echo "${tag}_asr_model_${inference_asr_model%.pth}"
}
# With --lm_weights, the test sets decode with the weight chosen on --lm_tune_set (stage 8).
lm_weight_choice=${asr_exp}/$(decode_tag_of "${inference_args}")_lm_weight.json
if [ -n "${lm_weights}" ] && [ -e "${lm_weight_choice}" ] && ! runs 8; then
    inference_args+=" --lm_weight $(${python} -c 'import json, sys; print(json.load(open(sys.argv[1]))["chosen"])' "${lm_weight_choice}")"
fi
decode_tag=$(decode_tag_of "${inference_args}")

# What stages 8 and 10 decode with: the models, the decoding config and options.
inference_opts=(--asr_train_config "${asr_exp}/config.yaml" --asr_model_file "${asr_exp}/${inference_asr_model}")
model_files=("${asr_exp}/config.yaml" "${asr_exp}/${inference_asr_model}")
if [ -n "${inference_config}" ]; then
    inference_opts+=(--config "${inference_config}")
    model_files+=("${inference_config}")
fi
if [ "${use_lm}" = true ]; then
    inference_opts+=(--lm_train_config "${lm_exp}/config.yaml" --lm_file "${lm_exp}/${inference_lm}")
    model_files+=("${lm_exp}/config.yaml" "${lm_exp}/${inference_lm}")
fi
decode_options() {  # decode_options <inference args>: what a decode's stamp records of its options
    printf -- '--option\n%s\n' "inference_args=$1" "inference_config=${inference_config}" \
        "lm=$( [ "${use_lm}" = true ] && echo "${lm_exp}" || echo none )"
}
decode_set() {  # decode_set <set> <inference args>: decode it into <decode dir of the args>/<set>
    local dset=$1 args=$2 dir n f i
    dir=${asr_exp}/$(decode_tag_of "${args}")/${dset}
    require "${dumpdir}/raw/${dset}/wav.scp" "stage 2 (formatting)"
    mapfile -t inputs < <(file_opts "${model_files[@]}" "${dumpdir}/raw/${dset}/wav.scp"; decode_options "${args}")
    needs_work "${dir}" "${inputs[@]}" || return 0
    rm -rf "${dir}"
    mkdir -p "${dir}/logdir"
    n=$(split_keys "${dumpdir}/raw/${dset}/wav.scp" "${inference_nj}" "${dir}/logdir/keys")
    log "  ${dset}: ${n} jobs, logs in ${dir}/logdir/asr_inference.*.log"
    # shellcheck disable=SC2086
    run_jobs "${n}" "${dir}/logdir/asr_inference" ${python} -m espnet_plugin.bin.asr_inference \
        --ngpu "$(( ngpu > 0 ? 1 : 0 ))" --batch_size "${inference_batch_size}" \
        --batch_frames "${inference_batch_frames}" \
        --data_path_and_name_and_type "${dumpdir}/raw/${dset}/wav.scp,speech,sound" \
        --key_file "${dir}/logdir/keys.JOB" --output_dir "${dir}/logdir/output.JOB" \
        "${inference_opts[@]}" ${args}
    for f in text token score; do
        for i in $(seq 1 "${n}"); do cat "${dir}/logdir/output.${i}/1best_recog/${f}"; done \
            | LC_ALL=C sort -k1,1 > "${dir}/${f}"
    done
    stamp write --dir "${dir}" "${inputs[@]}"
}
score_set() {  # score_set <decode dir of a set> <set>: WER and CER (if not up to date)
    local dir=$1 dset=$2 unit
    require "${dir}/text" "stage 8 (decoding)"
    for unit in word char; do
        mapfile -t inputs < <(file_opts "${dumpdir}/raw/${dset}/text" "${dir}/text")
        needs_work "${dir}/score_${unit}" "${inputs[@]}" || continue
        ${python} -m espnet_plugin.recipe.score --ref "${dumpdir}/raw/${dset}/text" \
            --hyp "${dir}/text" --unit "${unit}" --name "${dset}" --out_dir "${dir}/score_${unit}"
        stamp write --dir "${dir}/score_${unit}" "${inputs[@]}"
    done
    if [ -e "${dir}/score_word/result.txt" ]; then
        log "  ${dset}: $(grep -h . "${dir}/score_word/result.txt" | tail -n 1)"
    fi
}

if runs 8; then
    log "Stage 8: decoding ${test_sets} with ${asr_exp}/${inference_asr_model}"
    require "${asr_exp}/config.yaml" "stage 5 (training)"
    require "${asr_exp}/${inference_asr_model}" "stage 5 (training)"
    if [ "${use_lm}" = true ]; then
        require "${lm_exp}/${inference_lm}" "stage 7 (LM training)"
        [ "${dry_run}" = true ] || [ "$(stamp digest --config "${asr_exp}/config.yaml:token_list")" = \
            "$(stamp digest --config "${lm_exp}/config.yaml:token_list")" ] \
            || die "the LM ${lm_exp} and the ASR model ${asr_exp} have different token lists" \
                   "(token_list of their config.yaml): train the LM with this recipe's tokens (stages 6-7)"
    fi
    if [ -n "${lm_weights}" ]; then
        log "  choosing the LM weight among ${lm_weights} on ${lm_tune_set}"
        scores=()
        for w in ${lm_weights}; do
            decode_set "${lm_tune_set}" "${inference_args} --lm_weight ${w}"
            dir=${asr_exp}/$(decode_tag_of "${inference_args} --lm_weight ${w}")/${lm_tune_set}
            score_set "${dir}" "${lm_tune_set}"
            scores+=("${w}=${dir}/score_word/result.json")
        done
        if [ "${dry_run}" = false ]; then
            chosen=$(${python} -m espnet_plugin.recipe.lm_weight --scores "${scores[@]}" \
                --tune_set "${lm_tune_set}" --out "${lm_weight_choice}")
            log "  LM weight ${chosen} (the lowest WER on ${lm_tune_set}; ${lm_weight_choice})"
            inference_args+=" --lm_weight ${chosen}"
            decode_tag=$(decode_tag_of "${inference_args}")
        fi
    fi
    for dset in ${test_sets}; do
        decode_set "${dset}" "${inference_args}"
    done
fi

# ---- 9: scoring ----
if runs 9; then
    log "Stage 9: scoring"
    for dset in ${test_sets}; do
        score_set "${asr_exp}/${decode_tag}/${dset}" "${dset}"
    done
fi

# ---- 10: profiling ----
if runs 10; then
    log "Stage 10: profiling the decoding of ${test_sets} (cache, time, memory)"
    device=$( [ "${ngpu}" -gt 0 ] && echo cuda || echo cpu )
    for dset in ${test_sets}; do
        dir=${asr_exp}/${decode_tag}/${dset}
        require "${dir}/text" "stage 8 (decoding)"
        mapfile -t inputs < <(file_opts "${model_files[@]}" "${dumpdir}/raw/${dset}/wav.scp"
                              decode_options "${inference_args}")
        inputs+=(--option "profile_utts=${profile_utts}" --option "device=${device}")
        # Only when batches are profiled, so that profiles made before these options stay current.
        [ -n "${profile_batch_sizes}" ] && inputs+=(--option "profile_batch_sizes=${profile_batch_sizes}"
                                                   --option "memory_budget_mb=${memory_budget_mb}")
        needs_work "${dir}/profile" "${inputs[@]}" || continue
        rm -rf "${dir}/profile"
        profile_opts=("${inference_opts[@]}")
        profile_opts=("${profile_opts[@]/#--config/--inference_config}")
        [ -n "${profile_utts}" ] && profile_opts+=(--max_utterances "${profile_utts}")
        # shellcheck disable=SC2086
        ${python} -m espnet_plugin.bin.profile_kv_cache "${profile_opts[@]}" --device "${device}" \
            --data_path_and_name_and_type "${dumpdir}/raw/${dset}/wav.scp,speech,sound" \
            --output_dir "${dir}/profile" --fs "${fs}" ${inference_args} > "${dir}/profile.log" 2>&1 \
            || { tail -n 20 "${dir}/profile.log"; die "profiling failed: see ${dir}/profile.log"; }
        if [ -n "${profile_batch_sizes}" ]; then
            budget_opts=()
            [ -n "${memory_budget_mb}" ] && budget_opts=(--memory_budget_mb "${memory_budget_mb}")
            # shellcheck disable=SC2086
            ${python} -m espnet_plugin.bin.benchmark_kv_batch "${profile_opts[@]}" \
                --device "${device}" --wav_scp "${dumpdir}/raw/${dset}/wav.scp" \
                --fs "${fs}" --batch_sizes ${profile_batch_sizes} "${budget_opts[@]}" \
                --output "${dir}/profile/kv_batch.json" ${inference_args} \
                > "${dir}/profile_batches.log" 2>&1 \
                || { tail -n 20 "${dir}/profile_batches.log"; die "batched profiling failed: see ${dir}/profile_batches.log"; }
        fi
        stamp write --dir "${dir}/profile" "${inputs[@]}"
        log "  ${dset}: $(grep -m1 'RTF' "${dir}/profile.log")"
    done
fi

# ---- 11: report ----
if runs 11 && [ "${dry_run}" = true ]; then
    log "Stage 11: (dry run) would write the report over ${expdir}"
elif runs 11; then
    log "Stage 11: comparison report over ${expdir}"
    ${python} -m espnet_plugin.recipe.report --exp_dir "${expdir}" --out_dir "${expdir}/report"
    log "  ${expdir}/report/RESULTS.md"
fi

# ---- 12: packing ----
if runs 12; then
    log "Stage 12: packing ${asr_exp} into ${packed_zip}"
    require "${asr_exp}/${inference_asr_model}" "stage 5 (training)"
    pack_files=("${token_files[@]}")
    stats_file=$(${python} -c 'import sys, yaml
print((yaml.safe_load(open(sys.argv[1])).get("normalize_conf") or {}).get("stats_file", ""))' \
        "${asr_exp}/config.yaml")
    [ -z "${stats_file}" ] || pack_files+=("${stats_file}")
    mapfile -t inputs < <(file_opts "${model_files[@]}" "${pack_files[@]}"
        for dset in ${test_sets}; do echo --file; echo "${asr_exp}/${decode_tag}/${dset}/score_word/result.json"; done)
    inputs+=(--option "inference_args=${inference_args}" --option "test_sets=${test_sets}")
    if needs_work "${asr_exp}/packed" "${inputs[@]}"; then
        pack_opts=()
        for f in "${pack_files[@]}"; do pack_opts+=(--file "${f}"); done
        if [ "${use_lm}" = true ]; then
            pack_opts+=(--lm_config "${lm_exp}/config.yaml" --lm_file "${lm_exp}/${inference_lm}")
        fi
        rm -rf "${asr_exp}/packed"
        ${python} -m espnet_plugin.recipe.pack --exp_dir "${asr_exp}" --weights "${inference_asr_model}" \
            --decode_dir "${decode_tag}" --test_sets "${test_sets}" --train_set "${train_set}${sp_suffix}" \
            --inference_config "${inference_config}" --inference_args "${inference_args}" \
            "${pack_opts[@]}" --out "${packed_zip}"
        stamp write --dir "${asr_exp}/packed" "${inputs[@]}"
    fi
fi

# ---- 13: upload ----
if runs 13 && [ -z "${hf_repo}" ]; then
    log "Stage 13: skipped: no --hf_repo (the Hugging Face repository to upload to)"
elif runs 13 && [ "${dry_run}" = true ]; then
    log "Stage 13: (dry run) would upload ${packed_zip} to ${hf_repo}"
elif runs 13; then
    log "Stage 13: uploading ${packed_zip} to https://huggingface.co/${hf_repo}"
    require "${packed_zip}" "stage 12 (packing)"
    ${python} -m espnet_plugin.recipe.upload --zip "${packed_zip}" --repo "${hf_repo}" \
        --private "${hf_private}"
fi

if [ "${dry_run}" = true ]; then
    log "Dry run: ${todo} output(s) to make or redo"
else
    log "Successfully finished. [elapsed=${SECONDS}s]"
fi
