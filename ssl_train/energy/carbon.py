"""Grid carbon intensity by region, and the arithmetic from joules to grams of CO2e.

The default table is CodeCarbon's data, read from the installed package (never downloaded):
countries by ISO 3166 alpha-3 code from ``global_energy_mix.json`` (each with its year), Google
Cloud regions from ``cloud/impact.csv`` (with the source URL it gives), and the world average.
AWS and Azure regions map to the country they are located in (location-based intensity). A
config may give its own intensity instead, with its source and year, which is what an auditor
will usually ask for (a supplier's or a market-based figure).
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import json

JOULES_PER_KWH = 3.6e6
CODECARBON = "CodeCarbon 3.3.2 data"

# Where the common AWS and Azure regions are (the providers' region lists).
CLOUD_REGION_COUNTRIES = {
    "aws:us-east-1": "USA", "aws:us-east-2": "USA", "aws:us-west-1": "USA",
    "aws:us-west-2": "USA", "aws:ca-central-1": "CAN", "aws:eu-west-1": "IRL",
    "aws:eu-west-2": "GBR", "aws:eu-west-3": "FRA", "aws:eu-central-1": "DEU",
    "aws:eu-north-1": "SWE", "aws:ap-northeast-1": "JPN", "aws:ap-southeast-1": "SGP",
    "aws:ap-southeast-2": "AUS", "aws:ap-south-1": "IND", "aws:sa-east-1": "BRA",
    "azure:eastus": "USA", "azure:eastus2": "USA", "azure:westus2": "USA",
    "azure:centralus": "USA", "azure:northeurope": "IRL", "azure:westeurope": "NLD",
    "azure:uksouth": "GBR", "azure:francecentral": "FRA", "azure:germanywestcentral": "DEU",
    "azure:swedencentral": "SWE", "azure:japaneast": "JPN", "azure:southeastasia": "SGP",
    "azure:australiaeast": "AUS", "azure:centralindia": "IND",
}


def _data(*parts: str):
    return importlib.resources.files("codecarbon").joinpath("data", *parts)


@functools.cache
def _countries() -> dict[str, dict]:
    return json.loads(_data("private_infra", "global_energy_mix.json").read_text())


@functools.cache
def _gcp_regions() -> dict[str, dict]:
    with _data("cloud", "impact.csv").open(encoding="utf-8-sig") as rows:
        return {f"gcp:{row['region']}": row for row in csv.DictReader(rows)
                if row["provider"] == "gcp"}


def known_regions() -> list[str]:
    """Every region name ``grid_intensity_of`` accepts."""
    return sorted({"world", *_countries(), *_gcp_regions(), *CLOUD_REGION_COUNTRIES})


def grid_intensity_of(region: str) -> dict:
    """{g_per_kwh, source, year, region} for a region name; KeyError names the valid ones."""
    if region == "world":
        world = json.loads(_data("private_infra", "carbon_intensity_per_source.json").read_text())
        return {"g_per_kwh": float(world["world_average"]), "year": 2019, "region": region,
                "source": f"{CODECARBON}: world average, {world['world_average_source']}"}
    if region in _gcp_regions():
        row = _gcp_regions()[region]
        return {"g_per_kwh": float(row["impact"]), "year": None, "region": region,
                "source": f"{CODECARBON}: cloud/impact.csv, Google Cloud region {row['region']} "
                          f"({row['source']}; the dataset states no year)"}
    country = CLOUD_REGION_COUNTRIES.get(region, region.upper())
    if country in _countries():
        entry = _countries()[country]
        where = (f"{region}, located in {entry['country_name']}" if region in CLOUD_REGION_COUNTRIES
                 else entry["country_name"])
        return {"g_per_kwh": float(entry["carbon_intensity"]), "year": int(entry["year"]),
                "region": region,
                "source": f"{CODECARBON}: global_energy_mix.json (Our World in Data electricity "
                          f"mix), {where}, location-based"}
    raise KeyError(region)


def co2e_grams(joules: float, g_per_kwh: float, pue: float) -> float:
    """Operational emissions of IT energy ``joules`` in a facility of the given PUE."""
    return joules / JOULES_PER_KWH * pue * g_per_kwh
