//! Which deployments a request may go to, and in what order.
//!
//! A *plan* is the ordered list of candidates for one request: the requested group's
//! deployments by `order` (lower first), shuffled by weight among equal orders (LiteLLM's
//! `simple-shuffle`: `weight`, else `rpm`, else `tpm`). The proxy walks the plan, sending the
//! same body to the next candidate when one fails before a byte reached the client.
//!
//! Not here (yet): health, cooldowns, budgets and fallback groups; the plan is pure data so
//! those can prune it without touching I/O.

use rand::Rng;
use sluice_config::{Deployment, ModelGroup};

/// The candidates for one request, best first.
#[derive(Debug)]
pub struct Plan<'a> {
    candidates: Vec<&'a Deployment>,
}

impl<'a> Plan<'a> {
    /// Orders `group`'s deployments for one request, drawing shuffle keys from `rng`.
    pub fn new(group: &'a ModelGroup, rng: &mut impl Rng) -> Self {
        // Weighted random order (Efraimidis–Spirakis): key = u^(1/w), largest first. Equal
        // weights give a uniform shuffle; a deployment with twice the weight comes first
        // twice as often.
        let mut keyed: Vec<(u32, f64, &Deployment)> = group
            .deployments
            .iter()
            .map(|d| {
                let u: f64 = rng.gen_range(f64::EPSILON..1.0);
                (d.order, u.powf(1.0 / shuffle_weight(d)), d)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        Self {
            candidates: keyed.into_iter().map(|(_, _, d)| d).collect(),
        }
    }

    /// The candidates in the order to try them.
    pub fn candidates(&self) -> &[&'a Deployment] {
        &self.candidates
    }
}

/// `weight` when set, else `rpm`, else `tpm`, else 1 — LiteLLM's order of preference.
fn shuffle_weight(d: &Deployment) -> f64 {
    if d.weight != 1.0 {
        return d.weight;
    }
    d.rpm.or(d.tpm).map_or(1.0, |v| v as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn group(yaml_entries: &str) -> ModelGroup {
        let yaml = format!("model_list:\n{yaml_entries}");
        let loaded = sluice_config::load_with_env(&yaml, &|_| None).unwrap();
        loaded.config.groups.into_iter().next().unwrap()
    }

    const E: &str = "    litellm_params: {model: openai/x, api_base: 'http://127.0.0.1:1/v1'";

    #[test]
    fn order_comes_first() {
        let g = group(&format!(
            "  - model_name: g\n{E}, order: 2}}\n  - model_name: g\n{E}, order: 1}}\n  - model_name: g\n{E}}}\n"
        ));
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20 {
            let ids: Vec<&str> = Plan::new(&g, &mut rng)
                .candidates()
                .iter()
                .map(|d| d.id.as_str())
                .collect();
            assert_eq!(ids, ["g.1", "g.0", "g.2"]);
        }
    }

    #[test]
    fn weight_biases_the_shuffle() {
        let g = group(&format!(
            "  - model_name: g\n{E}, weight: 3}}\n  - model_name: g\n{E}, weight: 1}}\n"
        ));
        let mut rng = StdRng::seed_from_u64(42);
        let first_heavy = (0..4000)
            .filter(|_| Plan::new(&g, &mut rng).candidates()[0].id == "g.0")
            .count();
        // P(heavy first) = 3/4 for weights 3:1; 4000 draws put it within ±0.03 (≈4.4σ).
        let share = first_heavy as f64 / 4000.0;
        assert!((0.72..0.78).contains(&share), "share {share}");
    }

    #[test]
    fn rpm_is_the_weight_when_weight_is_unset() {
        let g = group(&format!(
            "  - model_name: g\n{E}, rpm: 900}}\n  - model_name: g\n{E}, rpm: 100}}\n"
        ));
        let mut rng = StdRng::seed_from_u64(1);
        let first = (0..2000)
            .filter(|_| Plan::new(&g, &mut rng).candidates()[0].id == "g.0")
            .count();
        assert!(first > 1700, "{first}");
    }
}
