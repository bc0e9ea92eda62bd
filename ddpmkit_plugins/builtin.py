"""Registers ddpmkit's built-in components through the same hooks a third-party plugin uses.

Targets are lazy strings so that listing plugins never imports torch.
"""

from ddpmkit import hookimpl

DDPMKIT_PLUGIN_API = [1, 2]


@hookimpl
def register_schedules(register):
    register("linear", "ddpmkit_plugins.linear:LinearSchedule")
    register("cosine", "ddpmkit_plugins.cosine:CosineSchedule")
    register("betas", "ddpmkit_plugins.given_betas:GivenBetas")


@hookimpl
def register_denoisers(register):
    register("unet", "ddpmkit_plugins.unet:UNet")
    # needs the optional extra ddpmkit[diffusers], as the diffusers sampler does
    register("diffusers-unet", "ddpmkit_plugins.diffusers_unet:DiffusersUNet")


@hookimpl
def register_samplers(register):
    register("ddpm", "ddpmkit_plugins.ddpm:DDPMSampler")
    register("ddim", "ddpmkit_plugins.ddim:DDIMSampler")
    register("heun", "ddpmkit_plugins.solvers:HeunSampler")
    register("dpmpp-2m", "ddpmkit_plugins.solvers:DPMSolverPP2M")
    # needs the optional extra ddpmkit[diffusers]; without it, naming it says which extra to install
    register("diffusers", "ddpmkit_plugins.diffusers_sampler:DiffusersSampler")


@hookimpl
def register_objectives(register):
    register("ddpm", "ddpmkit_plugins.objectives:DDPMObjective")
    register("flow", "ddpmkit_plugins.objectives:FlowObjective")
    register("edm", "ddpmkit_plugins.objectives:EDMObjective")
