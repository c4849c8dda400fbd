"""Worker of experiments/parity/run.py: the official DINO code on Fashion-MNIST, and the kNN.

Runs under a Python with torch and torchvision (experiments/parity/requirements-parity.txt),
never sslx's. It imports facebookresearch/dino's own modules from the folder given (fetched
outside this repository; see experiments/parity/RESULTS.md) and uses them unchanged where they
decide the learning: `train_one_epoch` (teacher on the two global crops, student on all crops,
DINOLoss, backward, per-tensor clipping, last-layer cancel, AdamW over `get_params_groups`, EMA),
`cosine_scheduler` for the lr / weight decay / momentum schedules, `VisionTransformer`,
`DINOHead`, `MultiCropWrapper`, `DataAugmentationDINO` and `eval_knn.knn_classifier`.

What the Fashion-MNIST recipe (configs/dino.py:fashion_mnist) changes, and nothing else:
- crop sizes 224 / 96 -> 28 / 12, global scale (0.4, 1), local scale (0.1, 0.4), 6 local crops;
- normalisation with Fashion-MNIST's mean / std instead of ImageNet's;
- the Gaussian blur's sigma range (0.1, 2.0) -> (0.1, 0.5): 2 px of blur on a 28-px image
  erases it (the preset scales it as it scales the crops). The preset also sets saturation and
  hue jitter to 0; on grey images replicated to RGB both are no-ops, so the official values stay;
- the network: ViT with 4-px patches, width 64, depth 4, 2 heads, qkv bias, LayerNorm eps 1e-6;
  head out_dim 1024, hidden 512, bottleneck 128, weight-normalised last layer;
- lr 4e-3 per 256 (1e-3 at batch 64), min lr 1e-5, warm-up 0.05 epoch (47 of an epoch's 937
  steps), weight decay 0.04 -> 0.4, teacher momentum 0.95 -> 1, teacher temperature 0.04, no
  last-layer freezing, clip 3.0, schedules over the run's `--steps` (as sslx's
  `--config.total_steps`). The official `cosine_scheduler` takes whole warm-up epochs, so it is
  called with one iteration per "epoch" (the same arrays).

Stand-ins for what a CPU lacks: experiments/bench/official_on_cpu.py (no CUDA, no
DistributedDataParallel, a one-process gloo group).
The Fashion-MNIST reader is written out here because this runs under the torch environment,
without sslx's dependencies.

  train: trains --steps steps with --seed; saves the teacher backbone (`<out>/teacher.pth`) and
         prints one JSON line {"images_per_second", "train_seconds", ...}.
  knn:   loads a backbone (an official .pth or an sslx export .safetensors) strictly into the
         official VisionTransformer and prints {"top1", "top5"} of the official weighted kNN
         (k 20, T 0.07) on the Fashion-MNIST test split against the train split.
"""

import argparse
import gzip
import json
import os
import sys
import time
from functools import partial

import numpy as np

FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)
MODEL = dict(patch_size=4, embed_dim=64, depth=4, num_heads=2, img_size=28)
HEAD = dict(out_dim=1024, hidden_dim=512, bottleneck_dim=128)
BATCH = 64
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LR = 4e-3 * BATCH / 256


def read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  prefix = "train" if split == "train" else "t10k"
  images = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
  labels = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
  return images, labels.astype(np.int64)


def import_official(folder: str):
  sys.path.insert(0, os.path.join(REPO, "experiments", "bench"))
  from official_on_cpu import import_official as load  # noqa: PLC0415  (experiments/bench)

  o = load(folder, with_knn=True)
  return o.main_dino, o.utils, o.vits, o.eval_knn


def backbone(vits, drop_path_rate: float = 0.0):
  from torch import nn

  return vits.VisionTransformer(
    img_size=[MODEL["img_size"]],
    patch_size=MODEL["patch_size"],
    embed_dim=MODEL["embed_dim"],
    depth=MODEL["depth"],
    num_heads=MODEL["num_heads"],
    mlp_ratio=4,
    qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    drop_path_rate=drop_path_rate,
  )


def fmnist_augmentation(main_dino, utils):
  """The official DataAugmentationDINO with the preset's sizes, normalisation and blur."""
  import torchvision.transforms as T

  class Sized:  # main_dino's `transforms`, with 224/96 crops resized and F-MNIST normalisation
    def __getattr__(self, name):
      return getattr(T, name)

    @staticmethod
    def RandomResizedCrop(size, **kwargs):  # noqa: N802  (torchvision's name)
      return T.RandomResizedCrop({224: 28, 96: 12}[size], **kwargs)

    @staticmethod
    def Normalize(mean, std):  # noqa: N802
      return T.Normalize(FMNIST_MEAN, FMNIST_STD)

  class Blur(utils.GaussianBlur):
    def __init__(self, p=0.5):
      super().__init__(p, radius_min=0.1, radius_max=0.5)

  main_dino.transforms = Sized()
  main_dino.utils = type("U", (), {"GaussianBlur": Blur, "Solarization": utils.Solarization})
  try:
    return main_dino.DataAugmentationDINO((0.4, 1.0), (0.1, 0.4), 6)
  finally:
    main_dino.transforms, main_dino.utils = T, utils


class Images:
  """Fashion-MNIST as the RGB PIL images an ImageFolder would give, with a transform."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
    self.images, self.labels, self.transform = images, labels, transform

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int):
    from PIL import Image

    return self.transform(Image.fromarray(self.images[i], "L").convert("RGB")), int(self.labels[i])


class FirstBatches:
  """The first `n` batches of a loader, with len() = n (train_one_epoch indexes schedules by it)."""

  def __init__(self, loader, n: int):
    self.loader, self.n = loader, n

  def __len__(self) -> int:
    return self.n

  def __iter__(self):
    for i, batch in enumerate(self.loader):
      if i == self.n:
        return
      yield batch


def train(a) -> dict:
  import torch

  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  np.random.seed(a.seed)
  import random

  random.seed(a.seed)
  main_dino, utils, vits, _ = import_official(a.official)
  from official_on_cpu import NoDDP  # noqa: PLC0415  (experiments/bench, on the path now)

  images, labels = fashion_mnist(a.data, "train")
  dataset = Images(images, labels, fmnist_augmentation(main_dino, utils))
  gen = torch.Generator().manual_seed(a.seed)
  loader = torch.utils.data.DataLoader(
    dataset,
    sampler=torch.utils.data.RandomSampler(dataset, generator=gen),
    batch_size=BATCH,
    num_workers=a.workers,
    drop_last=True,
    persistent_workers=a.workers > 0,
  )

  def wrapped():
    head = vits.DINOHead(MODEL["embed_dim"], HEAD["out_dim"], use_bn=False, norm_last_layer=True,
                         hidden_dim=HEAD["hidden_dim"], bottleneck_dim=HEAD["bottleneck_dim"])  # fmt: skip
    return utils.MultiCropWrapper(backbone(vits), head)

  student, teacher_without_ddp = wrapped(), wrapped()
  student, teacher = NoDDP(student), teacher_without_ddp
  teacher_without_ddp.load_state_dict(student.module.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  steps = a.steps
  dino_loss = main_dino.DINOLoss(HEAD["out_dim"], 8, 0.04, 0.04, 0, 1, student_temp=0.1)
  optimizer = torch.optim.AdamW(utils.get_params_groups(student))
  warmup = int(round(0.05 * (len(dataset) // BATCH)))
  lr_schedule = utils.cosine_scheduler(LR, 1e-5, steps, 1, warmup_epochs=warmup)
  wd_schedule = utils.cosine_scheduler(0.04, 0.4, steps, 1)
  momentum_schedule = utils.cosine_scheduler(0.95, 1.0, steps, 1)
  args = argparse.Namespace(epochs=1, clip_grad=3.0, freeze_last_layer=0)

  start = time.time()
  stats = main_dino.train_one_epoch(
    student, teacher, teacher_without_ddp, dino_loss, FirstBatches(loader, steps), optimizer,
    lr_schedule, wd_schedule, momentum_schedule, 0, None, args,
  )  # fmt: skip
  seconds = time.time() - start
  os.makedirs(a.out, exist_ok=True)
  torch.save(teacher_without_ddp.backbone.state_dict(), os.path.join(a.out, "teacher.pth"))
  return dict(
    steps=steps, train_seconds=seconds, images_per_second=steps * BATCH / seconds,
    final_loss=stats["loss"], threads=a.threads, workers=a.workers,
  )  # fmt: skip


def knn(a) -> dict:
  import torch
  from torch import nn

  torch.set_num_threads(a.threads)
  _, _, vits, eval_knn = import_official(a.official)
  if a.weights.endswith(".safetensors"):
    from safetensors.torch import load_file

    state = load_file(a.weights)
  else:
    state = torch.load(a.weights, map_location="cpu")
  model = backbone(vits)
  model.load_state_dict(state, strict=True)
  model.eval()
  mean = torch.tensor(FMNIST_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(FMNIST_STD).view(1, 3, 1, 1)

  def features(images: np.ndarray) -> torch.Tensor:
    out = []
    with torch.no_grad():
      for i in range(0, len(images), 500):
        x = torch.from_numpy(images[i : i + 500]).float().div(255.0)
        x = x[:, None].expand(-1, 3, -1, -1)
        out.append(model((x - mean) / std))
    return nn.functional.normalize(torch.cat(out), dim=1, p=2)

  train_x, train_y = fashion_mnist(a.data, "train")
  test_x, test_y = fashion_mnist(a.data, "test")
  top1, top5 = eval_knn.knn_classifier(
    features(train_x), torch.from_numpy(train_y), features(test_x), torch.from_numpy(test_y),
    20, 0.07, num_classes=10,
  )  # fmt: skip
  return dict(top1=top1, top5=top5)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("what", choices=("train", "knn"))
  p.add_argument("--official", required=True, help="folder with main_dino.py, eval_knn.py")
  p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
  p.add_argument("--out", help="train: folder for teacher.pth")
  p.add_argument("--weights", help="knn: a .pth or .safetensors backbone")
  a = p.parse_args()
  proto = os.fdopen(os.dup(1), "w", buffering=1)  # their prints go to stderr, our JSON to stdout
  sys.stdout = sys.stderr
  result = (train if a.what == "train" else knn)(a)
  proto.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
