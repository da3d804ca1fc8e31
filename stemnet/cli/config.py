"""``stemnet config``: list, copy, show, validate and match configuration files."""

from __future__ import annotations

from pathlib import Path

import click

from stemnet.cli.app import OVERRIDE_HELP, cli
from stemnet.shipped import ConfigFile


@cli.group()
def config() -> None:
    """Show, validate, list or copy configuration files (a FILE or a shipped NAME)."""


@config.command("list")
def config_list() -> None:
    """The shipped configs by kind; use a NAME wherever a config file is asked for."""
    from stemnet.shipped import shipped_configs, shipped_dir

    click.echo(f"shipped configs in {shipped_dir('configs')}:")
    for kind, names in shipped_configs().items():
        click.echo(f"  {kind:<11} {' '.join(names)}")


@config.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
def config_copy(name: str, dest: Path) -> None:
    """Copy shipped config NAME (e.g. training/demo) to DEST (a file or a folder) to edit."""
    from stemnet.shipped import copy_config

    click.echo(f"copied {name} to {copy_config(name, dest)}")


@config.command("show")
@click.argument("file", type=ConfigFile())
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def config_show(file: Path, overrides: tuple) -> None:
    """Print FILE, resolved and validated, with overrides applied, as YAML."""
    from simulation.config import load_config  # every section, the simulator's too
    from stemnet.config import to_yaml

    click.echo(to_yaml(load_config(file, overrides)), nl=False)


@config.command("validate")
@click.argument("file", type=ConfigFile())
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def config_validate(file: Path, overrides: tuple) -> None:
    """Check FILE; print 'ok' and its sections, or a one-line error."""
    from simulation.config import load_config  # every section, the simulator's too

    cfg = load_config(file, overrides)
    sections = [name for name in type(cfg).model_fields if name in cfg.model_fields_set]
    click.echo(f"{file}: ok ({', '.join(sections) or 'defaults only'})")


@config.command("match")
@click.argument("micrograph", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--material", required=True, help="Perovskite of the specimen (e.g. SrTiO3).")
@click.option("--zone", type=click.Choice(["001", "110"]), default="001", show_default=True)
@click.option("--pixel-size", "pixel_size", type=click.FloatRange(min=0, min_open=True), help="Å per pixel (overrides the file).")
@click.option("--energy-kev", type=click.FloatRange(60, 300), help="Beam energy (overrides the file).")
@click.option("--convergence-mrad", type=click.FloatRange(min=0, min_open=True), help="Probe semi-angle.")
@click.option("--haadf-mrad", metavar="INNER,OUTER", help="HAADF collection semi-angles, e.g. 60,200.")
@click.option("--abf-mrad", metavar="INNER,OUTER", help="ABF collection semi-angles, e.g. 10,20.")
@click.option("--bf-mrad", metavar="INNER,OUTER", help="BF collection semi-angles, e.g. 0,10.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the config here.")
def config_match(micrograph, material, zone, pixel_size, energy_kev, convergence_mrad, haadf_mrad, abf_mrad,
                 bf_mrad, out) -> None:
    """Print a simulation config matched to MICROGRAPH, with the source of each value."""
    from simulation.matching import match, to_text

    cfg, sources = match(micrograph, material=material, zone=zone, pixel_size_ang=pixel_size, energy_kev=energy_kev,
                         convergence_mrad=convergence_mrad,
                         detectors_mrad={"haadf": haadf_mrad, "abf": abf_mrad, "bf": bf_mrad})
    text = to_text(cfg, sources, micrograph)
    if out is not None:
        from stemnet.atomic import write_atomic

        write_atomic(out, text.encode())
    click.echo(text, nl=False)
