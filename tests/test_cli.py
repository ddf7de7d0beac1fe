"""Every command of the plugin ends on bad input the same way: one line that names the file or
option, exit status 1, no traceback."""

import subprocess
import sys

import pytest

COMMANDS = {
    "espnet_plugin.recipe.score": ["--ref", "{missing}", "--hyp", "{missing}", "--out_dir", "{tmp}"],
    "espnet_plugin.recipe.compare": ["--ref", "{missing}", "--hyp_a", "{missing}", "--hyp_b", "{missing}"],
    "espnet_plugin.recipe.report": ["--exp_dir", "{missing}"],
    "espnet_plugin.recipe.tokenizer": ["--text", "{missing}", "--out_dir", "{tmp}", "--token_type", "char"],
    "espnet_plugin.recipe.format_data": ["--src", "{missing}", "--dst", "{tmp}/dst"],
    "espnet_plugin.recipe.librispeech": ["--librispeech_dir", "{missing}", "--data_dir", "{tmp}"],
}


@pytest.mark.parametrize("module", COMMANDS)
def test_bad_input_is_one_line_and_status_1(module, tmp_path):
    missing = tmp_path / "does_not_exist"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in COMMANDS[module]]
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{module}: error: ") and str(missing) in last, result.stderr
