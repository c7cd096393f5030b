"""The seed architecture is the blog's; the losses are the blog's in logit form."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers.blog_reference import Discriminator as BlogDiscriminator, Generator as BlogGenerator, blog_losses
from train import losses, models, regularisation
from train.__main__ import FIXED_ON_RESUME
from train.networks import NetworkOptions, dcgan, seed
from train.data.images import MNIST, ImageSpec
from train.errors import CheckpointError, DataError
from train.sharing.export import _build_to_fit

LOSS_TOLERANCE = 1e-5  # float32 BCE on probabilities vs softplus on logits
UPSAMPLE_TOLERANCE = 1e-5  # float32, relative to the reference's norm: the same sums, in another order


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_seed_networks_have_the_blogs_parameter_counts_and_shapes():
    generator, discriminator = models.build("seed", z_dim=100)
    blog_generator, blog_discriminator = BlogGenerator(100), BlogDiscriminator()
    assert count(generator) == count(blog_generator) == 1_636_033
    assert count(discriminator) == count(blog_discriminator) == 26_545
    assert [p.shape for p in generator.parameters()] == [p.shape for p in blog_generator.parameters()]
    assert [b.shape for b in discriminator.buffers()] == [b.shape for b in blog_discriminator.buffers()]
    z = torch.randn(5, 100)
    assert generator(z).shape == (5, 1, 28, 28)
    assert discriminator(generator(z)).shape == (5,)


def test_seed_networks_compute_the_blogs_functions():
    torch.manual_seed(1)
    generator, discriminator = models.build("seed", z_dim=100, options=NetworkOptions(upsample="native"))
    blog_generator, blog_discriminator = BlogGenerator(100), BlogDiscriminator()
    # Same parameter and (saved) buffer order and shapes, so our weights copy into the blog's positionally.
    with torch.no_grad():
        for ours, blog in ((generator, blog_generator), (discriminator, blog_discriminator)):
            saved_names = ours.state_dict().keys()
            saved = [buffer for name, buffer in ours.named_buffers() if name in saved_names]
            for mine, theirs in zip([*ours.parameters(), *saved], [*blog.parameters(), *blog.buffers()], strict=True):
                theirs.copy_(mine)
    z = torch.randn(7, 100)
    images = generator(z)
    assert torch.equal(images, blog_generator(z))
    assert torch.equal(discriminator(images).sigmoid(), blog_discriminator(images).squeeze(1))


def test_bce_is_the_blogs_loss_with_the_label_convention_flipped():
    torch.manual_seed(2)
    real_logits, fake_logits = torch.randn(64) * 3, torch.randn(64) * 3

    class BlogDiscriminatorOf(nn.Module):  # the blog's D outputs P(fake) = sigmoid(-our logit)
        def forward(self, x):
            return torch.where(x[:, :1] > 0, -real_logits, -fake_logits).sigmoid().unsqueeze(1)

    real_marker, fake_marker = torch.ones(64, 1), -torch.ones(64, 1)
    blog_d_loss, blog_g_loss = blog_losses(BlogDiscriminatorOf(), fake_marker, real_marker)
    d_loss = losses.load("bce").discriminator(real_logits, fake_logits)
    g_loss = losses.load("bce").generator(fake_logits)
    torch.testing.assert_close(d_loss, blog_d_loss, rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)
    torch.testing.assert_close(g_loss, blog_g_loss, rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)


def test_bce_on_logits_stays_finite_where_sigmoid_then_bce_saturates():
    logits = torch.tensor([-200.0, 200.0])
    assert torch.isfinite(losses.load("bce").discriminator(logits, -logits))
    assert torch.isfinite(losses.load("bce").generator(logits))


def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert losses.load("hinge").discriminator(real, fake).item() == (0 + 0.5) / 2 + (0 + 1.5) / 2
    assert losses.load("hinge").generator(fake).item() == 0.75


def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight_norm_and_differentiable_in_it():
    # D(x) = <w, x> + b has the same input gradient w at every image: the penalty is ||w||^2, whose
    # gradient in w is 2w (the second backward the D step takes through the first).
    discriminator = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
    real = torch.rand(8, 1, 28, 28, requires_grad=True)
    penalty = regularisation.r1_penalty(discriminator(real).squeeze(1), real)
    weight = discriminator[1].weight
    torch.testing.assert_close(penalty, weight.square().sum(), rtol=1e-5, atol=0)
    penalty.backward()
    torch.testing.assert_close(weight.grad, 2 * weight.detach(), rtol=1e-5, atol=0)
    assert real.grad is None  # for a linear D the penalty does not depend on the images


def test_lazy_r1_weighs_every_kth_step_so_the_mean_weight_per_step_is_gamma():
    weights = [regularisation.r1_weight(0.1, 4, step) for step in range(1, 13)]
    assert weights == [0, 0, 0, 0.4] * 3
    assert [regularisation.r1_weight(0.1, 1, step) for step in range(1, 4)] == [0.1] * 3
    assert [regularisation.r1_weight(0.0, 4, step) for step in range(1, 9)] == [0.0] * 8


def test_dcgan_shapes():
    generator, discriminator = models.build("dcgan", z_dim=64)
    images = generator(torch.randn(3, 64))
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    assert discriminator(images).shape == (3,)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 64), (1, 48)])
def test_dcgan_is_built_for_the_datas_size_channels_and_classes(channels, size):
    images = ImageSpec(channels, size, size, 4, "sha256:test")
    generator, discriminator = models.build("dcgan", z_dim=16, conditional=True, images=images)
    labels = torch.tensor([0, 3, 1])
    drawn = generator(torch.randn(3, 16), labels)
    assert drawn.shape == (3, channels, size, size) and generator.images == images and generator.num_classes == 4
    assert discriminator(drawn, labels).shape == (3,)


def test_dcgans_discriminator_is_built_at_the_width_asked():
    """model.d_width: the first convolution's channels, doubled at each halving; the same logit shape."""
    generator, discriminator = models.build("dcgan", z_dim=16, conditional=True, options=NetworkOptions(d_width=48))
    convolutions = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convolutions] == [48, 96, 1]
    labels = torch.tensor([0, 3, 1])
    assert discriminator(generator(torch.randn(3, 16), labels), labels).shape == (3,)


def test_dcgans_generator_is_built_at_the_width_asked_and_rebuilt_from_what_a_run_recorded(tmp_path):
    """model.g_width: the channels into G's last transposed convolution, doubled towards its first; the same images.
    A recorded model config (state.json, generator.json) that names it rebuilds that generator; one without the
    key describes the 64-wide one, which the file does not fit: refused by name."""
    generator = models.build_generator("dcgan", 16, conditional=True, options=NetworkOptions(g_width=32))
    transposed = [m for m in generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in transposed] == [(16 + 32, 64), (64, 32), (32, 1)]
    assert generator(torch.randn(3, 16), torch.tensor([0, 3, 1])).shape == (3, 1, 28, 28)
    weights = tmp_path / "generator.safetensors"
    save_file(generator.state_dict(), weights)
    recorded = {"arch": "dcgan", "z_dim": 16, "conditional": True, "g_width": 32, "bn_group": None}
    assert NetworkOptions.of(recorded) == NetworkOptions(g_width=32)
    rebuilt = _build_to_fit(recorded, MNIST, weights, tmp_path / "state.json")
    shapes = {name: tensor.shape for name, tensor in generator.state_dict().items()}
    assert {name: tensor.shape for name, tensor in rebuilt.state_dict().items()} == shapes
    del recorded["g_width"]
    with pytest.raises(CheckpointError, match="does not fit the generator"):
        _build_to_fit(recorded, MNIST, weights, tmp_path / "state.json")


# Another value of each network option, and the architecture that reads it: a new option must be added here.
ANOTHER_VALUE = {"upsample": ("seed", "native"), "class_norm": ("dcgan", True), "d_width": ("dcgan", 32),
                 "g_width": ("dcgan", 32)}


@pytest.mark.parametrize("option", [field.name for field in dataclasses.fields(NetworkOptions)])
def test_each_network_option_says_truly_which_network_it_changes_and_whether_its_weights_shapes(option):
    """The resume checks (__main__.FIXED_ON_RESUME) and the recorded files' schemas are derived from each option's
    declaration: at another value it changes the shapes of its own network's weights exactly when it says it does,
    and never the other network's."""
    arch, value = ANOTHER_VALUE[option]

    def shapes(options: NetworkOptions) -> dict[str, dict]:
        networks = models.build(arch, z_dim=16, conditional=True, options=options)
        return {name: {key: tensor.shape for key, tensor in network.state_dict().items()}
                for name, network in zip(("generator", "discriminator"), networks)}

    default, changed = shapes(NetworkOptions()), shapes(NetworkOptions(**{option: value}))
    network = {field.name: field.metadata for field in dataclasses.fields(NetworkOptions)}[option]["network"]
    other = {"generator": "discriminator", "discriminator": "generator"}[network]
    assert default[other] == changed[other]
    assert (default[network] != changed[network]) == (f"model.{option}" in FIXED_ON_RESUME)
    assert option in NetworkOptions.names(network) and option not in NetworkOptions.names(other)


def test_mnists_dcgan_keeps_its_parameter_names_and_shapes():
    """Checkpoints and exports written before the networks were built from the data load into today's."""
    shapes = {name: tuple(p.shape) for name, p in models.build_generator("dcgan", 100).state_dict().items()}
    assert shapes == {"net.0.weight": (100, 128, 7, 7), "net.1.weight": (128,), "net.1.bias": (128,),
                      "net.1.running_mean": (128,), "net.1.running_var": (128,), "net.1.num_batches_tracked": (),
                      "net.3.weight": (128, 64, 4, 4), "net.4.weight": (64,), "net.4.bias": (64,),
                      "net.4.running_mean": (64,), "net.4.running_var": (64,), "net.4.num_batches_tracked": (),
                      "net.6.weight": (64, 1, 4, 4), "net.6.bias": (1,)}


@pytest.mark.parametrize("arch, images, message", [
    ("dcgan", ImageSpec(1, 30, 30, 0, "x"), "square images of a size that halves to at most 8 .* these are 30x30"),
    ("dcgan", ImageSpec(3, 32, 64, 0, "x"), "these are 32x64"),
    ("seed", ImageSpec(3, 32, 32, 0, "x"), "model.arch=seed .* draws 1x28x28 images; these are 3x32x32: use "
                                          "model.arch=dcgan"),
])
def test_networks_that_cannot_draw_the_data_are_refused_by_name(arch, images, message):
    with pytest.raises(DataError, match=message):
        models.build(arch, 100, images=images)


@pytest.mark.parametrize("batch, channels_in, channels_out, size", [(2, 256, 128, 7), (3, 128, 64, 14), (1, 3, 2, 5)])
def test_fused_upsample_conv_is_the_native_function_forward_and_backward(batch, channels_in, channels_out, size):
    torch.manual_seed(3)
    x = torch.randn(batch, channels_in, size, size, requires_grad=True)
    weight = torch.randn(channels_out, channels_in, 3, 3, requires_grad=True) / (3 * channels_in ** 0.5)
    upstream = torch.randn(batch, channels_out, 2 * size, 2 * size)
    native = nn.functional.conv2d(nn.UpsamplingBilinear2d(scale_factor=2)(x), weight, padding=1)
    native_grads = torch.autograd.grad(native, (x, weight), upstream)
    fused = seed.upsample_conv3x3(x, weight, seed.shifted_interpolation(size))
    fused_grads = torch.autograd.grad(fused, (x, weight), upstream)
    assert relative_error(fused, native) < UPSAMPLE_TOLERANCE
    for ours, reference in zip(fused_grads, native_grads):
        assert relative_error(ours, reference) < UPSAMPLE_TOLERANCE


def test_dcgans_first_layer_is_the_transposed_convolution_it_replaces_forward_and_backward():
    torch.manual_seed(5)
    ours = dcgan.LatentToMap(132, 128, 7, bias=False)
    reference = nn.ConvTranspose2d(132, 128, 7, bias=False)
    reference.load_state_dict(ours.state_dict())  # the same parameter, in the same layout
    z = torch.randn(6, 132, requires_grad=True)
    upstream = torch.randn(6, 128, 7, 7)
    mine, theirs = ours(z), reference(z[:, :, None, None])
    assert relative_error(mine, theirs) < UPSAMPLE_TOLERANCE
    for a, b in zip(torch.autograd.grad(mine, (z, ours.weight), upstream),
                    torch.autograd.grad(theirs, (z, reference.weight), upstream)):
        assert relative_error(a, b) < UPSAMPLE_TOLERANCE


def test_both_seed_generators_compute_the_same_function_from_the_same_weights():
    torch.manual_seed(4)
    fused, native = (models.build("seed", 100, options=NetworkOptions(upsample=upsample))[0]
                     for upsample in ("fused", "native"))
    native.load_state_dict(fused.state_dict())
    z = torch.randn(16, 100)
    assert relative_error(fused(z), native(z)) < UPSAMPLE_TOLERANCE


@pytest.mark.parametrize("arch", ["seed", "dcgan"])
def test_conditional_networks_read_the_label_and_add_only_its_embeddings(arch):
    plain_generator, plain_discriminator = models.build(arch, z_dim=100)
    generator, discriminator = models.build(arch, z_dim=100, conditional=True)
    # The unconditional networks are untouched; the label enters through one embedding in each network.
    assert set(generator.state_dict()) - set(plain_generator.state_dict()) == {"label.embedding.weight"}
    assert set(discriminator.state_dict()) - set(plain_discriminator.state_dict()) == {"projection.embedding.weight"}
    z, labels = torch.randn(10, 100), torch.arange(10)
    images = generator(z, labels)
    assert images.shape == (10, 1, 28, 28) and discriminator(images, labels).shape == (10,)
    other = (labels + 1) % 10
    assert not torch.allclose(images, generator(z, other))
    assert not torch.allclose(discriminator(images, labels), discriminator(images, other))


def test_class_norm_moves_each_batchnorm_of_g_by_its_class_and_starts_as_the_plain_conditional_g():
    """model.class_norm: per-class offsets of every BatchNorm's gain and bias, zero at the start, so a new generator
    draws what the conditional generator of the same weights draws; trained offsets make each class's maps its own."""
    plain = models.build_generator("dcgan", 100, conditional=True)
    generator = models.build_generator("dcgan", 100, conditional=True, options=NetworkOptions(class_norm=True))
    added = set(generator.state_dict()) - set(plain.state_dict())
    assert added == {f"net.{i}.class_{kind}.weight" for i in (1, 4) for kind in ("gain", "bias")}
    assert generator.net[1].class_gain.weight.shape == (10, 128)
    assert generator.net[4].class_bias.weight.shape == (10, 64)
    plain.load_state_dict({k: v for k, v in generator.state_dict().items() if k not in added})
    z, labels = torch.randn(10, 100), torch.arange(10)
    assert torch.equal(generator(z, labels), plain(z, labels))
    with torch.no_grad():
        generator.net[4].class_bias.weight[3].fill_(1.0)  # class 3's maps only
    moved = generator(z, labels) != plain(z, labels)
    assert moved[3].any() and not moved[torch.arange(10) != 3].any()


def test_a_loss_is_one_module_named_for_its_kind_and_says_how_ds_outputs_are_logged():
    from train.errors import ConfigError
    from train.losses._base import GANLoss
    assert losses.KINDS == ("bce", "hinge")  # train/losses/bce.py, train/losses/hinge.py
    assert all(isinstance(losses.load(kind), GANLoss) for kind in losses.KINDS)
    with pytest.raises(ConfigError, match=r"loss.kind='lsgan' is not a loss of this code; the losses are bce, hinge"):
        losses.load("lsgan")
    real, fake = torch.tensor([3.0, 1.0]), torch.tensor([-2.0, 0.0])
    assert [v.item() for v in losses.load("hinge").summary(real, fake)] == [2.0, -1.0]  # scores, not sigmoids
    assert losses.load("bce").summary(real, fake)[0].item() == pytest.approx(float(real.sigmoid().mean()))


def test_a_network_is_one_module_named_for_its_arch_and_the_config_takes_the_folders_kinds():
    from train import networks
    from train.config import CHOICES
    from train.errors import ConfigError
    assert networks.KINDS == ("dcgan", "seed") == CHOICES["model.arch"]  # train/networks/dcgan.py, seed.py
    for arch in networks.KINDS:
        generator, discriminator = models.build(arch, 8, conditional=True)
        z, labels = torch.randn(4, 8), torch.arange(4)
        assert generator(z, labels).shape == (4, 1, 28, 28) and discriminator(generator(z, labels), labels).shape == (4,)
    with pytest.raises(ConfigError, match=r"model.arch='resnet' is not a network of this code; the networks are "
                                          r"dcgan, seed \(one module each in train/networks/\)"):
        models.build("resnet", 8)
