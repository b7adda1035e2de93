"""$ per 1M tokens from measured goodput and a hardware profile, against dated API prices; break-even volume.
The formulas, with a worked example, are in docs/bench_cost.md.

    H  = 730 hours per month           u = utilisation (share of the month serving at the measured goodput)
    G  = goodput at the SLO (input + output tokens/s of the requests that met it, at the highest load level
         that meets the SLO); g_in, g_out its input and output parts
    owned:  fixed F = purchase / amortization_months + other_per_month + idle_w/1000 * H * $/kWh
            energy per busy hour e = (power_w - idle_w)/1000 * $/kWh
    cloud:  fixed F = usd_per_hour * H (an always-on instance), e = 0
    monthly cost at u:  C(u) = F + e * u * H           tokens at u: T(u) = G * 3600 * u * H
    $ / 1M tokens (this traffic's mix)  = C(u) / T(u) * 1e6
    $ / 1M input  = p * C(u) / (g_in * 3600 * u * H) * 1e6,  $ / 1M output = (1 - p) * C(u) / (g_out * ...) * 1e6
        where p = prefill's share of request time (sum TTFT / sum E2E over the good requests)
    API cost of the same traffic: T_in * price_in + T_out * price_out  (per 1M tokens)
    break-even monthly volume V* (tokens): F + e * V/(G*3600) = a * V  =>  V* = F / (a - e/(G*3600)),
        a = the API's price per token at this traffic's input/output mix; reachable if V* <= G*3600*H
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

HOURS_PER_MONTH = 730.0


class Hardware(BaseModel):
    """bench/hardware/*.yaml"""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    kind: Literal["owned", "cloud"]
    purchase_usd: float | None = Field(None, gt=0, description="owned: price of the whole machine")
    amortization_months: float | None = Field(None, gt=0)
    power_w: float | None = Field(None, ge=0, description="owned: wall power while serving")
    idle_power_w: float = Field(0, ge=0, description="owned: wall power while idle")
    usd_per_kwh: float | None = Field(None, ge=0)
    other_usd_per_month: float = Field(0, ge=0, description="owned: hosting, network, maintenance")
    usd_per_hour: float | None = Field(None, gt=0, description="cloud: instance price")
    utilization: float = Field(0.5, gt=0, le=1, description="share of the month serving at the measured goodput")
    source: str = Field(description="where the prices come from")
    as_of: dt.date

    @model_validator(mode="after")
    def _complete(self):
        need = (
            ("purchase_usd", "amortization_months", "power_w", "usd_per_kwh")
            if self.kind == "owned"
            else ("usd_per_hour",)
        )
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.kind} profile needs {', '.join(missing)}")
        return self

    def fixed_per_month(self) -> float:
        if self.kind == "cloud":
            return self.usd_per_hour * HOURS_PER_MONTH
        idle = self.idle_power_w / 1000 * HOURS_PER_MONTH * self.usd_per_kwh
        return self.purchase_usd / self.amortization_months + self.other_usd_per_month + idle

    def energy_per_busy_hour(self) -> float:
        if self.kind == "cloud":
            return 0.0
        return max(self.power_w - self.idle_power_w, 0) / 1000 * self.usd_per_kwh


class ApiPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    provider: str
    input_usd_per_1m: float = Field(ge=0)
    output_usd_per_1m: float = Field(ge=0)
    source: str
    as_of: dt.date
    note: str = ""


class ApiPrices(BaseModel):
    """bench/api_prices.yaml"""

    model_config = ConfigDict(extra="forbid")
    currency: Literal["USD"] = "USD"
    models: list[ApiPrice] = Field(min_length=1)


def load_hardware(path: Path | str) -> Hardware:
    """A hardware profile: a YAML file, or the name of a packaged one (cloud-2vcpu, cloud-rtx4090,
    rtx4090-workstation)."""
    from ..core import config, resources

    named = resources.hardware_profiles().get(str(path))
    return config.load(named or Path(path), Hardware, what="hardware profile").model


def load_prices(path: Path | None = None) -> ApiPrices:
    """An API price list (default: the packaged api_prices.yaml)."""
    from ..core import config, resources

    return config.load(path or resources.path("api_prices.yaml"), ApiPrices, what="API price list").model


def self_hosting(hw: Hardware, goodput: dict) -> dict | None:
    """Cost figures from one load level's goodput (stats.summarize()['goodput']); None without good tokens."""
    g_in, g_out = goodput["input_tokens_per_s"], goodput["output_tokens_per_s"]
    g = g_in + g_out
    if g <= 0 or g_out <= 0:
        return None
    u = hw.utilization
    busy_h = u * HOURS_PER_MONTH
    cost = hw.fixed_per_month() + hw.energy_per_busy_hour() * busy_h
    t_in, t_out = g_in * 3600 * busy_h, g_out * 3600 * busy_h
    p = goodput.get("prefill_time_share") or 0.0
    return {
        "hardware": hw.name,
        "kind": hw.kind,
        "utilization": u,
        "monthly_cost_usd": cost,
        "fixed_usd_per_month": hw.fixed_per_month(),
        "energy_usd_per_busy_hour": hw.energy_per_busy_hour(),
        "tokens_per_month": t_in + t_out,
        "input_tokens_per_month": t_in,
        "output_tokens_per_month": t_out,
        "capacity_tokens_per_month": g * 3600 * HOURS_PER_MONTH,
        "usd_per_1m_tokens": cost / (t_in + t_out) * 1e6,
        "usd_per_1m_input": p * cost / t_in * 1e6 if t_in else None,
        "usd_per_1m_output": (1 - p) * cost / t_out * 1e6,
        "prefill_time_share": p,
        "input_share": t_in / (t_in + t_out),
        "hardware_source": hw.source,
        "hardware_as_of": hw.as_of.isoformat(),
    }


def versus_apis(own: dict, prices: ApiPrices, goodput_tokens_per_s: float) -> list[dict]:
    """Each API's cost for the same monthly traffic, the ratio to self-hosting and the break-even volume."""
    rows = []
    t_in, t_out = own["input_tokens_per_month"], own["output_tokens_per_month"]
    share_in = own["input_share"]
    e_per_token = own["energy_usd_per_busy_hour"] / (goodput_tokens_per_s * 3600)
    for m in prices.models:
        api_cost = (t_in * m.input_usd_per_1m + t_out * m.output_usd_per_1m) / 1e6
        a = (share_in * m.input_usd_per_1m + (1 - share_in) * m.output_usd_per_1m) / 1e6  # $ per token, this mix
        v_star = own["fixed_usd_per_month"] / (a - e_per_token) if a > e_per_token else None
        rows.append(
            {
                "api": m.name,
                "provider": m.provider,
                "input_usd_per_1m": m.input_usd_per_1m,
                "output_usd_per_1m": m.output_usd_per_1m,
                "blended_usd_per_1m": a * 1e6,
                "api_monthly_cost_usd": api_cost,
                "self_hosted_monthly_cost_usd": own["monthly_cost_usd"],
                "api_over_self_hosted": api_cost / own["monthly_cost_usd"] if own["monthly_cost_usd"] else None,
                "break_even_tokens_per_month": v_star,
                "break_even_reachable": v_star is not None and v_star <= own["capacity_tokens_per_month"],
                "break_even_utilization": v_star / own["capacity_tokens_per_month"] if v_star is not None else None,
                "source": m.source,
                "as_of": m.as_of.isoformat(),
            }
        )
    return rows


def lora_break_even(
    merged_tokens_per_s: float,
    multi_tokens_per_s: float,
    hw: Hardware | None,
    adapters=(1, 2, 4, 8, 16, 32),
    loads=(0.01, 0.1, 0.5, 1.0),
) -> dict:
    """Merged models (one deployment per fine-tune) vs one multi-LoRA server, same traffic per adapter.

    T_m, T_l: goodput of one machine serving a merged model / serving N adapters; r = T_l / T_m.
    N fine-tunes, each with traffic x * T_m: merged needs N * ceil(x) machines, multi-LoRA ceil(N * x / r).
    Multi-LoRA needs fewer machines while the per-adapter traffic is below r * T_m (for N >= 2); above it
    merged deployments cost 1/r less per token."""
    import math

    r = multi_tokens_per_s / merged_tokens_per_s
    per_machine = (hw.fixed_per_month() + hw.energy_per_busy_hour() * HOURS_PER_MONTH) if hw else None
    rows = []
    for n in adapters:
        for x in loads:
            m_merged = n * math.ceil(x - 1e-9)
            m_lora = math.ceil(n * x / r - 1e-9)
            rows.append(
                {
                    "adapters": n,
                    "traffic_per_adapter_tokens_per_s": x * merged_tokens_per_s,
                    "traffic_per_adapter_share_of_machine": x,
                    "machines_merged": m_merged,
                    "machines_multi_lora": m_lora,
                    "monthly_usd_merged": m_merged * per_machine if per_machine else None,
                    "monthly_usd_multi_lora": m_lora * per_machine if per_machine else None,
                }
            )
    return {
        "ratio": r,
        "merged_tokens_per_s": merged_tokens_per_s,
        "multi_lora_tokens_per_s": multi_tokens_per_s,
        "break_even_traffic_per_adapter_tokens_per_s": r * merged_tokens_per_s,
        "break_even_tokens_per_month_per_adapter": r * merged_tokens_per_s * 3600 * HOURS_PER_MONTH,
        "machine_usd_per_month": per_machine,
        "hardware": hw.name if hw else None,
        "rows": rows,
    }
