"""Linear and MLP heads in torch, as scikit-learn classifiers, so that one selection path serves every head.

AdamW with a cosine schedule; after every epoch the loss on the validation set decides early stopping, and the
weights of the best epoch are kept. Seeded: the same data and seed give the same weights on CPU. `history_` holds
every epoch's mean train loss (over its batches, in train mode) and val loss: train_heads plots it.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from transfer_learning.heads.torch_layers import layers_module


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchHead(ClassifierMixin, BaseEstimator):
    def __init__(self, hidden=(), dropout=0.0, epochs=100, lr=1e-3, weight_decay=1e-4, batch_size=256,
                 patience=10, class_weight=None, random_state=0):
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None = None):
        self.classes_, targets = np.unique(y, return_inverse=True)
        val_x, val_y = validation if validation is not None else (X, y)
        known = np.isin(val_y, self.classes_)  # a class absent from training cannot be predicted anyway
        if not known.any():  # no usable held-out row: early stopping then watches the training loss
            val_x, val_y, known = X, y, np.ones(len(y), bool)
        val_targets = np.searchsorted(self.classes_, val_y[known])

        run_on = device()
        generator = torch.Generator().manual_seed(self.random_state)
        torch.manual_seed(self.random_state)
        self.module_ = layers_module(X.shape[1], list(self.hidden), len(self.classes_), self.dropout).to(run_on)
        weight = None
        if self.class_weight == "balanced":
            weight = torch.as_tensor(compute_class_weight("balanced", classes=np.arange(len(self.classes_)),
                                                          y=targets), dtype=torch.float32, device=run_on)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        x = torch.as_tensor(X, dtype=torch.float32, device=run_on)
        t = torch.as_tensor(targets, dtype=torch.long, device=run_on)
        vx = torch.as_tensor(val_x[known], dtype=torch.float32, device=run_on)
        vt = torch.as_tensor(val_targets, dtype=torch.long, device=run_on)

        steps_per_epoch = -(-len(x) // self.batch_size)
        optimizer = torch.optim.AdamW(self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs * steps_per_epoch)
        best_loss, best_state, since_best = float("inf"), None, 0
        self.best_epoch_, self.epochs_run_, self.history_ = 0, 0, []
        for epoch in range(1, self.epochs + 1):
            self.module_.train()
            order = torch.randperm(len(x), generator=generator).to(run_on)
            train_loss = torch.zeros((), device=run_on)  # summed on the device: no sync per batch
            for start in range(0, len(x), self.batch_size):
                batch = order[start:start + self.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(self.module_(x[batch]), t[batch])
                loss.backward()
                optimizer.step()
                schedule.step()
                train_loss += loss.detach() * len(batch)
            self.module_.eval()
            with torch.inference_mode():
                val_loss = loss_fn(self.module_(vx), vt).item() if len(vt) else 0.0
            self.epochs_run_ = epoch
            self.history_.append({"epoch": epoch, "train_loss": train_loss.item() / len(x), "val_loss": val_loss})
            if val_loss < best_loss:
                best_loss, since_best, self.best_epoch_ = val_loss, 0, epoch
                best_state = {k: v.detach().clone() for k, v in self.module_.state_dict().items()}
            else:
                since_best += 1
                if since_best >= self.patience:
                    break
        if best_state is None:
            raise ValueError(f"the validation loss was never finite (training diverged): lower lr (now {self.lr})")
        self.module_.load_state_dict(best_state)
        self.module_.eval().cpu()
        self.best_val_loss_ = best_loss
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.module_(torch.as_tensor(X, dtype=torch.float32))
            return torch.softmax(logits, dim=1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(weight out×in, bias) of every Linear, in order; ReLU sits between them."""
        return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
                for m in self.module_ if isinstance(m, nn.Linear)]
