"""Sample text from a trained byte-level language model (Mamba or Transformer, same command).

    python generate.py --workdir=runs/mamba --prompt="def main(" --max_new_tokens=200 \\
        --temperature=0.8 --top_p=0.95 --num_samples=4

The latest checkpoint in `--workdir` is loaded with `training.load_run`. The prompt is encoded as
UTF-8 bytes and preceded by the document separator, so the model reads it as the start of a
document. An empty prompt samples a document from scratch. Each sample ends at the separator
token or after `--max_new_tokens` tokens.
"""

import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory to load the latest checkpoint from.")
flags.DEFINE_string("prompt", "", "Text to continue (UTF-8); empty starts a new document.")
flags.DEFINE_integer("max_new_tokens", 256, "Maximum bytes (tokens) to generate per sample.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 decodes greedily (argmax).")
flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens only; unset keeps all.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this "
                   "probability mass, in (0, 1]; 1 keeps all.")
flags.DEFINE_integer("seed", 0, "Random seed of the sampler.")
flags.DEFINE_integer("num_samples", 1, "Number of samples, generated as one batch.")
flags.mark_flag_as_required("workdir")


def check_flags() -> None:
    """Raise ValueError for flag values outside their ranges (`SamplingConfig` checks the rest)."""
    if FLAGS.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")
    if FLAGS.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
    if FLAGS.top_k is not None and FLAGS.top_k < 1:
        raise ValueError(f"--top_k must be >= 1 (or unset to keep all tokens), got {FLAGS.top_k}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"generate.py: error: unexpected arguments {argv[1:]}; pass the prompt as "
                 "--prompt=TEXT")

    from training.metrics import QuietLibraries
    logging.get_absl_handler().addFilter(QuietLibraries())

    # Imported here so that `--help` and flag errors do not wait for JAX.
    import jax
    from data import ByteTokenizer
    from generation import SamplingConfig, generate
    from training import load_run

    sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
    try:
        check_flags()
        sampling.validate(ByteTokenizer.vocab_size)
    except ValueError as error:
        # `SamplingConfig` names its fields, which are the flags' names without the dashes.
        message = str(error)
        if not message.startswith("--"):
            message = f"--{message}"
        sys.exit(f"generate.py: error: {message}")

    logging.info("Loading the latest checkpoint of %s", FLAGS.workdir)
    try:
        model, config = load_run(FLAGS.workdir)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"generate.py: error: could not load a checkpoint from --workdir="
                 f"{FLAGS.workdir}: {error}")
    logging.info("Loaded a %s model", config.model.architecture)
    if config.data.get("task"):
        sys.exit(f"generate.py: error: --workdir={FLAGS.workdir} is a run of the synthetic task "
                 f"{config.data.task!r}, whose tokens are not text; pass the workdir of a run "
                 "on a text corpus")

    tokenizer = ByteTokenizer()
    try:
        prompt_ids = [tokenizer.SEPARATOR, *tokenizer.encode(FLAGS.prompt).tolist()]
    except UnicodeEncodeError as error:
        sys.exit(f"generate.py: error: --prompt is not valid text ({error.reason} at characters "
                 f"{error.start} to {error.end - 1}); pass UTF-8 text")
    start = time.perf_counter()
    try:
        result = generate(model, [prompt_ids] * FLAGS.num_samples,
                          max_new_tokens=FLAGS.max_new_tokens, sampling=sampling,
                          seed=FLAGS.seed, stop_token=tokenizer.SEPARATOR)
    except ValueError as error:  # For example a prompt longer than the model's positions.
        sys.exit(f"generate.py: error: --prompt of {len(prompt_ids) - 1} bytes with "
                 f"--max_new_tokens={FLAGS.max_new_tokens}: {error}")
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error) and "Out of memory" not in str(error):
            raise
        sys.exit(f"generate.py: error: out of memory for --num_samples={FLAGS.num_samples} and "
                 f"a prompt plus --max_new_tokens={FLAGS.max_new_tokens} tokens (a Transformer's "
                 "key/value cache grows with them); lower either")
    seconds = time.perf_counter() - start
    logging.info("Generated %d tokens in %.2f s, compilation included",
                 int(result.lengths.sum() + result.stopped.sum()), seconds)

    for i, ids in enumerate(result.token_lists()):
        ending = "separator" if result.stopped[i] else "max_new_tokens"
        print(f"--- sample {i}: {len(ids)} bytes, ended at {ending} ---")
        print(FLAGS.prompt + tokenizer.decode(ids))


if __name__ == "__main__":
    app.run(main)
