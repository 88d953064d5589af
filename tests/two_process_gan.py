"""Run by tests/test_training.py under torchrun (two fresh CPU processes): trains a tiny GAN for
``steps`` steps in one go and, in another folder, for ``first`` steps then resumed to ``steps``,
and writes this process's networks and losses to ``OUT/rank<r>.pt``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/two_process_gan.py OUT 4 2
"""

import sys

import torch
from accelerate import PartialState

from textimg.data import NUM_CLASSES, ShapesDataset
from textimg.discriminator import Discriminator, DiscriminatorConfig
from textimg.gan import GANTrainConfig, train_gan
from textimg.generator import Generator, GeneratorConfig
from textimg.text import TextEncoder
from textimg.utils import seeded


def main(out_dir: str, steps: int, first: int) -> None:
    torch.set_num_threads(1)
    state = PartialState(cpu=True)  # gloo over loopback, one process per rank
    text_encoder = TextEncoder("tiny-bert")
    data = ShapesDataset(64, image_size=32)
    text_encoder.encode_dataset(data.captions(), progress=False)
    cfg = GANTrainConfig.preset("quick", batch_size=8)

    def nets():
        with seeded(0):
            return (Generator(GeneratorConfig.preset("quick", text_dim=text_encoder.dim)),
                    Discriminator(DiscriminatorConfig.preset("quick", text_dim=text_encoder.dim,
                                                             num_classes=NUM_CLASSES)))

    results = {"processes": state.num_processes}
    for name, plan in (("straight", [steps]), ("resumed", [first, steps])):
        for n in plan:
            G, D = nets()
            history = train_gan(G, D, text_encoder, data, cfg, steps=n, checkpoint_dir=f"{out_dir}/{name}",
                                checkpoint_every=2, progress=False, log_every=1, device="cpu")
        results[name] = {"G": G.state_dict(), "D": D.state_dict(), "g_loss": history["g_loss"]}
    torch.save(results, f"{out_dir}/rank{state.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
