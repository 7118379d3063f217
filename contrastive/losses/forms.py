"""How a loss is called: the input forms by which a pipeline accepts or refuses a loss.

A loss module declares the calls it supports as a class attribute, e.g.
``input_forms: ClassVar[frozenset[LossForm]] = frozenset({"two_views"})``; a pipeline lists the
forms it can produce and refuses a loss that declares none of them. A loss that declares
nothing (a user's own, written before this existed) is taken on trust.

The forms (N rows, D dimensions):

- ``"two_views"``: ``loss(z1, z2)``, both (N, D), row i of each a positive pair (NT-Xent).
- ``"multi_view"``: ``loss(z, labels)``, z (V*N, D) view-major, labels (V*N,) instance ids:
  every view of an image a positive of the others, everything else a negative (SupCon on views).
- ``"query_key_negatives"``: ``loss(query, key, negatives)``, (N, D), (N, D), (K, D) (MoCo).
- ``"embeddings_labels"``: ``loss(embeddings, labels)``, (N, D) and (N,) class ids (metric learning).
- ``"embeddings_labels_memory"``: ``loss(embeddings, labels, memory, memory_labels)``, the batch (N, D) and
  (N,) as anchors against the batch and a memory of earlier embeddings (M, D) and labels (M,) as candidates
  (the cross-batch memory, XBM).
- ``"student_teacher_center"``: ``loss(student_out, teacher_out, center, teacher_temperature=None)``, (V, N, K),
  (G, N, K) and (K,): a student's outputs of V views against a teacher's of the first G, centred (DINO).
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

LossForm = Literal[
    "two_views",
    "multi_view",
    "query_key_negatives",
    "embeddings_labels",
    "embeddings_labels_memory",
    "student_teacher_center",
]
LOSS_FORMS: tuple[LossForm, ...] = get_args(LossForm)


def input_forms(loss: nn.Module) -> frozenset[LossForm] | None:
    """The forms ``loss`` declares (its ``input_forms`` attribute), or None where it declares none.

    Raises:
        ValueError: a declared form that is not one of :data:`LOSS_FORMS` (a typo would refuse every pipeline).
    """
    forms = getattr(loss, "input_forms", None)
    if forms is None:
        return None
    unknown = set(forms) - set(LOSS_FORMS)
    if unknown:
        raise ValueError(
            f"{type(loss).__name__}.input_forms holds {sorted(unknown)}: the forms are {', '.join(LOSS_FORMS)}"
        )
    return frozenset(forms)
