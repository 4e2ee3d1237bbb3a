import torch

from pulid_lab import world
from pulid_lab.data import render_bank
from pulid_lab.distill import DistillRound, _ddim_to, distill_round, student_targets
from pulid_lab.sampling import training_scheduler

from test_base import TINY  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)


class FakeTeacher:
    def predict(self, x, t, tokens):
        return torch.tanh(x * 0.7 + t.view(-1, 1, 1, 1) / 1000.0) + tokens.mean()


def test_one_student_step_lands_where_two_teacher_steps_land():
    torch.manual_seed(0)
    abar = training_scheduler().alphas_cumprod
    x_t = torch.randn(3, 3, 8, 8)
    t, t_mid = torch.tensor([999, 749, 249]), torch.tensor([874, 624, 124])
    t_end = torch.tensor([749, 499, -1])
    tokens = torch.randn(3, 4, 5)
    v = student_targets(FakeTeacher(), x_t, t, t_mid, t_end, tokens, abar)
    view = (-1, 1, 1, 1)
    ab_e = torch.where(t_end >= 0, abar[t_end.clamp(min=0)], torch.ones(())).view(view)
    teacher = FakeTeacher()
    x_mid = _ddim_to(x_t, teacher.predict(x_t, t, tokens), abar[t].view(view), abar[t_mid].view(view))
    x_end = _ddim_to(x_mid, teacher.predict(x_mid, t_mid, tokens), abar[t_mid].view(view), ab_e)
    assert torch.allclose(_ddim_to(x_t, v, abar[t].view(view), ab_e), x_end, atol=1e-4)


def test_distill_round_trains_the_student_and_not_the_teacher():
    from pulid_lab.base import OriginalModel
    torch.manual_seed(0)
    teacher = OriginalModel(TINY)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bank = render_bank(world.TRAIN_IDS[:8], 2, seed=0, progress=False)
    student = distill_round(teacher, bank, DistillRound(teacher_steps=8, steps=2, batch=2), progress=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, student.unet.state_dict()[k]) for k, v in teacher.unet.state_dict().items())
