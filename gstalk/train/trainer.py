"""``gstalk train``: fit an avatar to a prepared, tracked dataset.

Stages: (1) static canonical fit (deformation off), (2) the audio-conditioned deformation
field and audio encoder (Gaussians at a lower rate), (3) joint fine-tune with extra weight
on the mouth; then the audio-to-motion model on the track; free Gaussians no training frame
shows are removed at the end. Losses: L1 + D-SSIM (kornia),
alpha vs the person mask, mouth-region weight, a close-up of the mouth rendered at the
dataset's full resolution (stages 2 and 3, :class:`MouthCrops`), offset regulariser.

Frames are read from disk on demand through a bounded cache. A checkpoint (all parameters,
optimiser state, densification statistics, random-generator states, stage and iteration)
is written atomically every ``checkpoint_every`` iterations, on Ctrl-C and at the end; a
re-run resumes from it and, with the same seed, ends with the same parameters as an
uninterrupted run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gstalk.audio.features import SilentAudioError, check_speech, compute_features
from gstalk.audio.phones import PhoneTimeline, phone_timeline
from gstalk.avatar.io import save_avatar
from gstalk.avatar.init import concat_sets, init_gaussians, mouth_prior, torso_gaussians
from gstalk.avatar.model import Avatar, AvatarConfig, Frame
from gstalk.avatar.render import render_frame
from gstalk.avatar.views import drawn_pixels
from gstalk.config import TrainOptions, resolve_device
from gstalk.errors import AT_LEAST_0, FileFormatError, between, check_ranges
from gstalk.gaussians.set import GaussianSet, rgb_to_sh
from gstalk.head.tracker import load_track
from gstalk.io.atomic import atomic_path
from gstalk.io.dataset import Dataset
from gstalk.train import densify
from gstalk.train.data import (FrameSource, MouthCrops, TrainingError, background_image, first_frame_colours,
                               scaled_camera)
from gstalk.train.motion import choose_phones, fit_audio_to_motion, fit_visemes, lip_inputs, motion_target
from gstalk.render import Cameras
from gstalk.render.metrics import psnr

Progress = Callable[[str, int, int, dict], None]
STAGES = ("static", "audio", "joint")
CODE_RANGE = 2.0  # audio codes beyond +-this are pulled back (tanh(2) = 0.96)
#: Free Gaussians drawn with less than this many pixels' worth of weight over the sampled
#: training frames are removed at the end (:meth:`Trainer.prune_unseen_free`).
UNSEEN_WEIGHT = 0.5


#: Training options that are counts, rates or weights: none may be negative (nor NaN).
NON_NEGATIVE = ("iters_static", "iters_audio", "iters_joint", "iters_a2m", "per_triangle", "torso_points",
                "mouth_crop", "field_expr", "densify_every", "max_gaussians", "checkpoint_every", "cache_frames",
                "lr_means", "lr_field", "w_ssim", "w_alpha", "w_mouth", "w_mouth_crop", "audio_prior", "w_offsets",
                "densify_grad")


def resolved(opts: TrainOptions, device: torch.device, prefix: str = "") -> TrainOptions:
    """``opts`` with the device's defaults filled in (0 = by device), or :class:`TrainingError`
    naming the first option no fit can use (its flag with ``prefix``, see :func:`check_ranges`)."""
    check_ranges(opts, {**{name: AT_LEAST_0 for name in NON_NEGATIVE}, "scale": between(0, 1),
                        "sh_degree": between(0, 3)}, TrainingError, prefix)
    gpu = device.type == "cuda"
    return replace(opts, per_triangle=opts.per_triangle or (8 if gpu else 2),
                   torso_points=opts.torso_points or (4000 if gpu else 800))


def _ssim_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import kornia

    return kornia.losses.ssim_loss(a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None], window_size=7)


class Trainer:
    def __init__(self, dataset: str | Path, avatar_dir: str | Path, opts: TrainOptions,
                 progress: Progress | None = None, log: Callable[[str], None] = print):
        from gstalk.avatar.io import claim_avatar_folder

        self._replace = claim_avatar_folder(avatar_dir, opts.overwrite)  # before any work
        self.ds = Dataset(dataset)
        self.out = Path(avatar_dir)
        self.dev = resolve_device(opts.device)
        self.opts = resolved(opts, self.dev)
        self.progress = progress or (lambda *a: None)
        self.log = log
        self.track = load_track(self.ds.root / "track.npz")
        if self.track.num_frames != self.ds.num_frames:
            raise TrainingError(f"track.npz has {self.track.num_frames} frames but the dataset {self.ds.num_frames}; "
                                "re-run 'gstalk track'")
        speech = self._speech()  # the clip's audio, or None to fit without it
        self.use_audio = speech is not None
        self.size = self._train_size()
        self.ckpt_path = self.out / "checkpoint.pt"
        torch.manual_seed(self.opts.seed)
        np.random.seed(self.opts.seed)
        random.seed(self.opts.seed)
        self.frames = FrameSource(self.ds, self.size, self.opts.cache_frames, self.dev)
        self.cam = scaled_camera(torch.as_tensor(self.track.K), torch.as_tensor(self.track.viewmat),
                                 self.track.width, self.size).to(self.dev)
        self.bg = background_image(self.ds, self.opts.background, self.size, self.dev)
        self.windows = None  # [T, W, D] audio windows of every frame; None: fitted without audio
        self.timeline = None  # the clip's phones (the viseme lip model's calibration)
        self.phones = "auto"  # the phones' source (AvatarConfig.phones)
        if speech is not None:
            self.phones, self.timeline = self._phones(speech)
            feats = compute_features(speech, self.ds.num_frames, self.ds.fps, self.opts.feature_kind,
                                     timeline=self.timeline)
            self.windows = torch.from_numpy(feats.windows).to(self.dev)
            for note in self.timeline.notes:
                self.log(f"the clip's audio: {note}")
        sig = self.ds.signals()
        self.blink = torch.from_numpy(np.nan_to_num(sig["blink"])).float().to(self.dev)
        self.avatar = self._build_avatar()
        self.free_step = float(self.avatar.rest_frames()[2].median())  # metres per triangle-local unit
        self._free = None
        self.train_idx = self.ds.train_indices
        self.gen = torch.Generator().manual_seed(self.opts.seed)
        self.mouth = None
        if self.opts.mouth_crop > 0 and self.size < self.ds.resolution:  # at full size it adds no detail
            mc = MouthCrops(self.ds, torch.as_tensor(self.track.K), torch.as_tensor(self.track.viewmat),
                            self.track.width, self.train_idx, self.opts.mouth_crop, self.opts.cache_frames,
                            self.dev)
            if mc.usable:
                self.mouth = mc

    def _speech(self) -> np.ndarray | None:
        """The clip's audio to fit with, or None to fit without audio (``opts.audio``: on, off,
        or auto = on when the clip has speech)."""
        mode = self.opts.audio
        if mode not in ("auto", "on", "off"):
            raise TrainingError(f"unknown audio mode {mode!r}: auto, on or off")
        if mode == "off":
            return None
        why, audio = None, None
        if not self.ds.has_audio:
            why = f"{self.ds.root} has no audio track"
        else:
            audio = self.ds.audio()
            try:
                check_speech(audio, f"the audio of {self.ds.root}")
            except SilentAudioError as e:
                why = str(e).split(";")[0]
        if why is None:
            return audio
        if mode == "on":
            raise TrainingError(f"{why}; an audio-driven avatar needs a clip with speech (or train with "
                                "--train.audio off for an avatar driven by tracked expressions)")
        self.log(f"{why}: fitting an avatar without audio (its deformation follows expression, blink and neck; "
                 "drive it with 'gstalk render AVATAR --expressions track.npz', not with speech)")
        return None

    def _train_size(self) -> int:
        if self.opts.scale > 0:
            return max(16, int(round(self.ds.resolution * self.opts.scale)))
        return self.ds.resolution if self.dev.type == "cuda" else min(128, self.ds.resolution)

    # ------------------------------------------------------------------ set-up
    def _phones(self, speech: np.ndarray) -> tuple[str, PhoneTimeline]:
        """The phones' source for this avatar (``--train.phones``; 'choose': by
        :func:`choose_phones`, for the viseme lip model) and the clip's timeline from it."""
        o = self.opts
        if o.phones == "phones":
            return "phones", phone_timeline(speech, source="phones")
        tl = phone_timeline(speech)
        if o.phones == "auto" or o.lip_motion != "visemes" or tl.source != "words":
            return "auto", tl
        from gstalk.avatar.io import head_for

        free = phone_timeline(speech, source="phones")
        head = head_for(self.track.model)
        n_expr = head.n_expr
        driven, lip_map = lip_inputs(head, torch.from_numpy(self.track.shape).float(), self.track.jaw,
                                     self.track.expr, self.ds.train_indices, n_expr)
        pick, line = choose_phones(self.ds, tl, free, self.track.jaw, self.track.expr, self.ds.train_indices, n_expr,
                                   driven, lip_map)
        self.log(line)
        return pick, free if pick == "phones" else tl

    def _build_avatar(self) -> Avatar:
        o = self.opts
        from gstalk.avatar.io import head_for

        head = head_for(self.track.model)  # the model the track was made with
        shape = torch.from_numpy(self.track.shape).float()
        bound, region = init_gaussians(head, shape, o.per_triangle, o.sh_degree, o.seed)
        prior = mouth_prior(head, shape) if o.audio_prior else None
        # without audio the (unused) audio networks keep their default sizes and there is no lip model
        audio_cfg = (dict(feature_kind=o.feature_kind, window=self.windows.shape[1],
                          feature_dim=self.windows.shape[2]) if self.windows is not None else
                     dict(feature_kind="none", lip_motion="none"))
        cfg = AvatarConfig(fps=self.ds.fps, resolution=self.ds.resolution, **audio_cfg,
                           expr_cond=min(o.field_expr, head.n_expr), sh_degree=o.sh_degree, background=o.background,
                           head_model=head.reference(), n_shape=head.n_shape, n_expr=head.n_expr, seed=o.seed,
                           mouth_centre=prior[0] if prior else None,
                           mouth_radius=prior[1] * o.audio_prior if prior else 0.0, expr_prior=o.expr_prior,
                           phones=self.phones)
        K = torch.as_tensor(self.track.K)
        vm = torch.as_tensor(self.track.viewmat)
        torso, tregion = self._torso_init(K, vm, o)
        g = concat_sets(bound, torso) if torso is not None else bound
        reg = torch.cat([region, tregion]) if torso is not None else region
        av = Avatar(cfg, head, shape, g, reg, K, vm).to(self.dev)
        self._colour_from_first_frame(av)
        if self.windows is not None:
            av.audio.set_normalisation(self.windows[torch.as_tensor(self.ds.train_indices)])
        return av

    def _torso_init(self, K, vm, o: TrainOptions):
        """Free Gaussians on the torso/neck pixels of the first frame, on a plane at the head's depth."""
        img, lab = self.ds.frame(0), self.ds.mask(0)
        ys, xs = np.nonzero(lab == 2)
        if len(ys) < 10:
            return None, None
        rng = np.random.default_rng(o.seed)
        pick = rng.choice(len(ys), size=min(o.torso_points, len(ys)), replace=False)
        u, v = xs[pick] + 0.5, ys[pick] + 0.5
        depth = -float(self.track.translation[0, 2]) + 0.03
        k = K.numpy()
        xc = (u - k[0, 2]) / k[0, 0] * depth
        yc = (v - k[1, 2]) / k[1, 1] * depth
        pts = np.stack([xc, -yc, -np.full_like(xc, depth)], 1)  # camera (OpenCV) -> world (y up, z back)
        cols = img[ys[pick], xs[pick]] / 255.0
        spacing = math.sqrt(len(ys) / max(len(pick), 1)) * depth / k[0, 0]
        return torso_gaussians(torch.from_numpy(pts).float(), torch.from_numpy(cols).float(), 0.7 * spacing,
                               o.sh_degree)

    @torch.no_grad()
    def _colour_from_first_frame(self, av: Avatar) -> None:
        """Give each head Gaussian the colour the first frame shows where it is: the pixel it
        projects to, or for one the frame cannot show, the colour of the nearest one it shows
        (:func:`first_frame_colours`)."""
        img = torch.from_numpy(self.ds.frame(0)).float().div(255).to(self.dev)
        params = self.track.params(slice(0, 1), device=self.dev)
        g = av.gaussians_at(Frame(params, deform=False))[0]
        cam = scaled_camera(av.K, av.viewmat, self.track.width, self.ds.resolution).to(self.dev)
        bound = av.binding >= 0
        _, r, _ = av.skin(params)
        normals = r[0, av.binding[bound], :, 2]
        col = first_frame_colours(g.means[bound], normals, cam, img)
        av.sh.data[bound, 0] = rgb_to_sh(col)

    # ------------------------------------------------------------------ one iteration
    def conditions(self, t: torch.Tensor, audio_model) -> torch.Tensor:
        """Smoothed audio codes of frames ``t``."""
        return audio_model.codes_at(self.windows, t.to(self.dev))

    def _photo_loss(self, rgb: torch.Tensor, img: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(1 - w_ssim) * (weighted) L1 + w_ssim * D-SSIM of a render against its frame."""
        l1 = (rgb - img).abs() if weight is None else (rgb - img).abs() * weight
        return (1 - self.opts.w_ssim) * l1.mean() + self.opts.w_ssim * _ssim_loss(rgb, img)

    def step_loss(self, t: int, stage: str, deform: bool):
        img, lab = self.frames.get(t)
        tt = torch.tensor([t])
        params = self.track.params(slice(t, t + 1), device=self.dev)
        audio = self.conditions(tt, self.avatar.audio).to(self.dev) if deform and self.use_audio else None
        frame = Frame(params, audio=audio, blink=self.blink[tt.to(self.dev)], deform=deform)
        gs, d = self.avatar.posed(frame)
        rgb, alpha, out = render_frame(self.avatar, gs[0], self.cam, self.bg)
        weight = torch.ones_like(img[..., :1])
        if stage == "joint":
            weight = weight + self.opts.w_mouth * (lab == 4)[..., None].float()
        loss = self._photo_loss(rgb, img, weight)
        if self.opts.background == "plate":
            person = (lab > 0).float()[..., None]
            loss = loss + self.opts.w_alpha * (alpha - person).abs().mean()
        if d is not None:
            loss = loss + self.opts.w_offsets * d.regulariser() * 1e3  # offsets are mm-scale
        if audio is not None:
            # the field reads tanh(code): keep codes where tanh still passes a gradient, or they
            # drift into saturation and every frame's audio looks the same to the field
            loss = loss + (audio.abs() - CODE_RANGE).clamp_min(0).square().mean()
        crop = self.mouth.get(t, self.opts.background) if (self.mouth is not None and stage != "static") else None
        if crop is not None and self.opts.w_mouth_crop > 0:
            cam, gt, bg = crop
            crgb, _, _ = render_frame(self.avatar, gs[0], cam, bg)
            loss = loss + self.opts.w_mouth_crop * self._photo_loss(crgb, gt)
        return loss, rgb.detach(), img, out

    # ------------------------------------------------------------------ optimisation
    def make_optimizer(self, stage: str) -> torch.optim.Optimizer:
        o, av = self.opts, self.avatar
        gl = 1.0 if stage == "static" else 0.2
        groups = [
            {"params": [av.means], "lr": o.lr_means * gl, "name": "means"},
            {"params": [av.quats], "lr": 0.001 * gl, "name": "quats"},
            {"params": [av.log_scales], "lr": 0.005 * gl, "name": "log_scales"},
            {"params": [av.opacity_logits], "lr": 0.05 * gl, "name": "opacity_logits"},
            {"params": [av.sh], "lr": 0.0025 * gl, "name": "sh"},
        ]
        if stage != "static":
            # networks: Adam's usual eps; the Gaussians' tiny eps turns vanishing gradients into
            # full-size steps
            nets = list(av.field.parameters()) + (list(av.audio.parameters()) if self.use_audio else [])
            groups.append({"params": nets, "lr": o.lr_field, "name": "networks", "eps": 1e-8})
        opt = torch.optim.Adam(groups, eps=1e-15)
        opt.register_step_pre_hook(self._before_step)
        opt.register_step_post_hook(self._after_step)
        return opt

    def _before_step(self, opt, args, kwargs) -> None:
        free = self.avatar.binding < 0
        self._free = (free, self.avatar.means.detach()[free].clone()) if bool(free.any()) else None

    @torch.no_grad()
    def _after_step(self, opt, args, kwargs) -> None:
        """Scale the free Gaussians' position steps by the head mesh's median triangle size.
        ``lr_means`` is in triangle-local units (a triangle's size, about a centimetre), but free
        Gaussians are placed in metres: at the same rate they moved a hundred times as fast,
        wandered tens of centimetres in the static stage, and ended in a clump hidden behind the
        head, the torso drawn by a handful of large ones (and the clump showed as dots from the
        side and back)."""
        if self._free is None:
            return
        free, before = self._free
        m = self.avatar.means.data
        m[free] = before + self.free_step * (m[free] - before)

    def densify(self, grad_accum: torch.Tensor, count: torch.Tensor, opt: torch.optim.Optimizer,
                stage: str) -> torch.optim.Optimizer:
        """Clone or split Gaussians with large screen-space gradients, prune faint ones
        (:mod:`gstalk.train.densify`: bindings kept, Adam's state carried, the cap kept);
        returns the optimizer over the new Gaussians."""
        av, o = self.avatar, self.opts
        p = densify.plan(grad_accum / count.clamp_min(1), av.log_scales, av.opacity_logits, o.densify_grad,
                         o.max_gaussians)
        g, region, source, fresh = densify.apply(av.gaussian_set(), av.region, p, self.gen)
        av.set_gaussians(g, region)
        new = self.make_optimizer(stage)
        densify.carry_adam_state(opt, new, source, fresh)
        return new

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, stage: str, it: int, opt, grad_accum, count) -> None:
        av = self.avatar
        state = {
            "stage": stage, "it": it, "binding": av.binding.cpu(), "region": av.region.cpu(),
            "gaussians": {k: v.detach().cpu() for k, v in av.gaussian_params().items()},
            "field": av.field.state_dict(), "audio": av.audio.state_dict(), "opt": opt.state_dict(),
            "grad_accum": grad_accum.cpu(), "count": count.cpu(), "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(), "options": asdict(self.opts),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.ckpt_path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self):
        import pickle

        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"gaussians", "binding", "region", "stage", "it"} <= set(state):
                raise ValueError("not a gstalk training checkpoint")
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            raise FileFormatError(f"{self.ckpt_path} cannot be resumed from ({str(e).splitlines()[0]}); delete it "
                                  "to start the fit over") from None
        av = self.avatar
        gs = state["gaussians"]
        av.set_gaussians(GaussianSet(gs["means"], gs["quats"], gs["log_scales"], gs["opacity_logits"], gs["sh"],
                                     binding=state["binding"]), state["region"])
        av.to(self.dev)
        av.field.load_state_dict(state["field"])
        av.audio.load_state_dict(state["audio"])
        av.invalidate()
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        return state

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        # same seed, same result (and an interrupted run resumes to the same parameters): the
        # scatter-adds in the backward passes must not depend on thread timing
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._run()
        finally:
            torch.use_deterministic_algorithms(was)

    def _run(self) -> Path:
        o = self.opts
        if self._replace:
            from gstalk.avatar.io import remove_avatar

            remove_avatar(self.out, self.log)
            self._replace = False
        plan = [("static", o.iters_static), ("audio", o.iters_audio), ("joint", o.iters_joint)]
        start_stage, start_it, state = 0, 0, None
        if self.ckpt_path.is_file():
            state = self.load_checkpoint()
            start_stage = STAGES.index(state["stage"])
            start_it = state["it"]
            self.log(f"resuming from {self.ckpt_path} ({state['stage']} iteration {start_it})")
        total = sum(n for _, n in plan)
        done_before = sum(n for _, n in plan[:start_stage]) + start_it
        t0 = time.perf_counter()
        for si, (stage, iters) in enumerate(plan):
            if si < start_stage:
                continue
            opt = self.make_optimizer(stage)
            n = self.avatar.num_gaussians
            grad_accum = torch.zeros(n, device=self.dev)
            count = torch.zeros(n, device=self.dev)
            it0 = 0
            if state is not None and si == start_stage:
                opt.load_state_dict(state["opt"])
                grad_accum, count = state["grad_accum"].to(self.dev), state["count"].to(self.dev)
                it0 = start_it
                state = None
            it = it0
            try:
                while it < iters:
                    t = int(self.train_idx[int(torch.randint(len(self.train_idx), (1,), generator=self.gen))])
                    loss, rgb, img, out = self.step_loss(t, stage, deform=stage != "static")
                    opt.zero_grad()
                    loss.backward()
                    if out.means2d.grad is not None:
                        g2 = out.means2d.grad[0].norm(dim=-1) * self.size / 2
                        vis = out.visible[0]
                        grad_accum[vis] += g2[vis]
                        count[vis] += 1
                    opt.step()
                    with torch.no_grad():
                        self.avatar.quats.data = torch.nn.functional.normalize(self.avatar.quats.data, dim=-1)
                    it += 1
                    self.avatar.invalidate()
                    if stage == "static" and o.densify_every and it % o.densify_every == 0 and it < 0.8 * iters:
                        opt = self.densify(grad_accum, count, opt, stage)
                        grad_accum = torch.zeros(self.avatar.num_gaussians, device=self.dev)
                        count = torch.zeros_like(grad_accum)
                    if o.checkpoint_every and it % o.checkpoint_every == 0 and it < iters:
                        self.save_checkpoint(stage, it, opt, grad_accum, count)
                    done = done_before + it - it0
                    el = time.perf_counter() - t0
                    self.progress(stage, it, iters, {"loss": float(loss.detach()), "psnr": psnr(rgb, img),
                                                     "gaussians": self.avatar.num_gaussians,
                                                     "eta": el / max(done - done_before, 1) * (total - done)})
            except KeyboardInterrupt:
                self.save_checkpoint(stage, it, opt, grad_accum, count)
                self.log(f"interrupted: checkpoint saved at {stage} iteration {it}; re-run to resume")
                raise
            done_before += iters - it0
            nxt = STAGES[si + 1] if si + 1 < len(STAGES) else None
            if nxt is not None:
                self.save_checkpoint(nxt, 0, self.make_optimizer(nxt), torch.zeros(self.avatar.num_gaussians),
                                     torch.zeros(self.avatar.num_gaussians))
        self.train_audio_to_motion()
        return self.finish()

    def train_audio_to_motion(self) -> None:
        """jaw, expression and blink from audio, supervised by the track (train frames); see
        :mod:`gstalk.train.motion`. Without audio there is nothing to learn them from (lip model
        'none')."""
        if not self.use_audio:
            self.avatar.cfg.lip_motion = "none"
            return
        a2m = self.avatar.a2m
        target = motion_target(self.track.jaw, self.track.expr, self.blink.cpu().numpy(), a2m.n_expr)
        fit_audio_to_motion(a2m, self.windows, target, self.train_idx, self.opts.iters_a2m, self.opts.seed + 1,
                            validate=False, log=self.log, progress=self.progress)
        self.avatar.cfg.lip_motion = "learned"
        if self.opts.lip_motion == "visemes":
            vm = self.avatar.visemes
            driven, lip_map = lip_inputs(self.avatar.head_model, self.avatar.shape, self.track.jaw, self.track.expr,
                                         self.train_idx, vm.n_expr)
            self.avatar.cfg.lip_motion = fit_visemes(vm, self.ds, self.timeline, self.track.jaw, self.track.expr,
                                                     self.train_idx, driven, self.log, lip_map=lip_map)

    def prune_unseen_free(self, max_frames: int = 32, min_weight: float = UNSEEN_WEIGHT) -> int:
        """Drop the free Gaussians that no training frame shows; returns how many.

        A Gaussian's weight in a frame is the sum over pixels of its share of the pixel's colour
        (:func:`gstalk.avatar.views.drawn_pixels`). Free Gaussians whose weight over up to ``max_frames`` training
        frames (spread over them, posed as in the last stage) is under ``min_weight`` pixels were
        hidden behind the head or the mesh's neck all along: nothing taught them, and from the
        side or back they showed as a sheet or stray dots. Head Gaussians stay: the unseen ones
        are the sides and back of the head (see :meth:`Avatar.set_view_fill`)."""
        av = self.avatar
        free = av.binding < 0
        if not bool(free.any()):
            return 0
        idx = np.asarray(self.train_idx)
        idx = idx[np.unique(np.linspace(0, len(idx) - 1, min(max_frames, len(idx))).round().astype(int))]
        b, tt = len(idx), torch.as_tensor(idx, device=self.dev)
        with torch.no_grad():  # the frames posed in one batch, as in the last stage
            audio = self.conditions(tt, av.audio).to(self.dev) if self.use_audio else None
            g, _ = av.posed_batch(Frame(self.track.params(idx, device=self.dev), audio=audio, blink=self.blink[tt]))
        cams = Cameras(self.cam.viewmats.expand(b, 4, 4), self.cam.Ks.expand(b, 3, 3), self.cam.width, self.cam.height)
        weight = drawn_pixels(g, cams)
        keep = ~(free & (weight < min_weight))
        dropped = int((~keep).sum())
        if dropped:
            av.set_gaussians(av.gaussian_set().subset(keep), av.region[keep])
            self.log(f"removed {dropped} of {int(free.sum())} free Gaussians that no training frame showed")
        return dropped

    def finish(self) -> Path:
        self.prune_unseen_free()
        motion = {k: getattr(self.track, k) for k in ("global_rot", "neck", "translation", "eyes", "eyelids", "jaw",
                                                      "expr")}
        bg = self.ds.background() if self.opts.background == "plate" else None
        save_avatar(self.avatar, self.out, motion, bg)
        if self.ckpt_path.is_file():
            self.ckpt_path.unlink()
        return self.out


def train(dataset, avatar_dir, opts: TrainOptions | None = None, progress: Progress | None = None,
          log: Callable[[str], None] = print) -> Path:
    return Trainer(dataset, avatar_dir, opts or TrainOptions(), progress, log).run()
