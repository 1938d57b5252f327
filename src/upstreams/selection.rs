//! Selection algorithms: pingora's (random, consistent hash), weighted round robin, and
//! the two pingora lacks (least connections, power of two choices), behind one trait,
//! picked once when the pool is built.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use pingora::lb::selection::{BackendIter, BackendSelection, Consistent, Random};
use pingora::lb::{Backend, Backends, LoadBalancer};

use super::health::BackendState;
use crate::config::{round_robin_turns, Selection};

/// A backend's place in its pool's `upstreams` list.
pub type BackendId = usize;

/// Chooses a backend among those `usable` accepts. `Backends` is pingora's view of the
/// pool, through which the active health checks run.
pub trait Selector: Send + Sync {
    fn select(&self, key: &[u8], usable: &dyn Fn(BackendId) -> bool) -> Option<BackendId>;
    fn backends(&self) -> &Backends;
}

/// Builds the selector `selection` names over `backends`, whose ids are `ids`.
pub fn build(
    selection: &Selection,
    backends: Backends,
    ids: HashMap<SocketAddr, BackendId>,
    states: Vec<Arc<BackendState>>,
) -> Box<dyn Selector> {
    match selection {
        Selection::RoundRobin => Box::new(RoundRobin::new(discovered(backends), &states)),
        Selection::Random => pingora_selector::<Random>(backends, ids),
        Selection::ConsistentHash { .. } => pingora_selector::<Consistent>(backends, ids),
        Selection::LeastConnections => Box::new(LeastConnections {
            backends: discovered(backends),
            states,
            next: AtomicUsize::new(0),
        }),
        Selection::PowerOfTwoChoices => Box::new(PowerOfTwoChoices {
            backends: discovered(backends),
            states,
        }),
    }
}

/// `backends` with their list read in, which their health checks go through; pingora's
/// own selectors read it as they are built.
fn discovered(backends: Backends) -> Backends {
    // Static discovery never waits: the list is there before the first health check.
    backends
        .update(|_| {})
        .now_or_never()
        .expect("static discovery does not block")
        .expect("static discovery does not fail");
    backends
}

/// pingora's [LoadBalancer] with one of its algorithms.
struct PingoraSelector<S: BackendSelection> {
    balancer: LoadBalancer<S>,
    ids: HashMap<SocketAddr, BackendId>,
}

fn pingora_selector<S>(backends: Backends, ids: HashMap<SocketAddr, BackendId>) -> Box<dyn Selector>
where
    S: BackendSelection + Send + Sync + 'static,
    S::Iter: BackendIter,
{
    let balancer = LoadBalancer::<S>::from_backends(backends);
    // Static discovery never waits: the selector is filled before the first request.
    balancer
        .update()
        .now_or_never()
        .expect("static discovery does not block")
        .expect("static discovery does not fail");
    Box::new(PingoraSelector { balancer, ids })
}

impl<S> Selector for PingoraSelector<S>
where
    S: BackendSelection + Send + Sync + 'static,
    S::Iter: BackendIter,
{
    fn select(&self, key: &[u8], usable: &dyn Fn(BackendId) -> bool) -> Option<BackendId> {
        // Bounds the walk over the selector's ring or list; it holds each backend once per
        // unit of weight, so this covers every backend.
        const MAX_ITERATIONS: usize = 1024;
        let id = |backend: &Backend| {
            backend
                .addr
                .as_inet()
                .and_then(|addr| self.ids.get(addr).copied())
        };
        let accept = |backend: &Backend, healthy: bool| healthy && id(backend).is_some_and(usable);
        id(&self.balancer.select_with(key, MAX_ITERATIONS, accept)?)
    }

    fn backends(&self) -> &Backends {
        self.balancer.backends()
    }
}

/// Weighted round robin over a fixed cycle of the backends, interleaved as nginx's smooth
/// weighted round robin interleaves them (weights 5, 1, 1 give a a b a c a a). A backend that
/// cannot be used is passed over and its turn goes to the next in the cycle, so the usable
/// ones keep their shares between them.
///
/// pingora's round robin would do as well, but each of its selections allocates a set of the
/// backends it visited and hashes an address to find the backend's id: a cost on every request.
struct RoundRobin {
    backends: Backends,
    /// Backend ids, which fit in two bytes: a pool has at most `MAX_UPSTREAMS`.
    cycle: Vec<u16>,
    next: AtomicUsize,
}

impl RoundRobin {
    fn new(backends: Backends, states: &[Arc<BackendState>]) -> RoundRobin {
        let weights: Vec<usize> = states.iter().map(|s| s.weight).collect();
        RoundRobin {
            backends,
            cycle: smooth_cycle(&round_robin_turns(&weights)),
            next: AtomicUsize::new(0),
        }
    }
}

/// Backends of one weight, which take their turns among themselves in id order.
struct SameWeight {
    turns: isize,
    ids: Vec<u16>,
    /// Where in `ids` the group's next backend in line is.
    place: usize,
    /// `ids[place]`, kept at hand for the choice of each turn.
    next_in_line: u16,
    /// The credit of the next in line.
    credit: isize,
}

/// One cycle of nginx's smooth weighted round robin: at each turn every backend gains its
/// weight in credit, and the one with the most credit (the first in the list of those tied)
/// is chosen and gives up the cycle's length.
///
/// Worked out over groups of backends of equal weight rather than over backends: the members
/// of a group gain alike, so they take their turns in id order, and each turn costs one step
/// per distinct weight instead of one per backend.
fn smooth_cycle(turns: &[usize]) -> Vec<u16> {
    let length: usize = turns.iter().sum();
    let mut groups: Vec<SameWeight> = Vec::new();
    for (id, &weight) in turns.iter().enumerate() {
        let id = u16::try_from(id).expect("a pool has at most MAX_UPSTREAMS backends");
        match groups.iter_mut().find(|g| g.turns == weight as isize) {
            Some(group) => group.ids.push(id),
            None => groups.push(SameWeight {
                turns: weight as isize,
                ids: vec![id],
                place: 0,
                next_in_line: id,
                credit: 0,
            }),
        }
    }
    (0..length)
        .map(|_| {
            for group in &mut groups {
                group.credit += group.turns;
            }
            let group = groups
                .iter_mut()
                // The most credit, then the lowest id, as one number: this loop is most
                // of the work.
                .max_by_key(|g| (g.credit << 16) | (u16::MAX - g.next_in_line) as isize)
                .expect("a pool has backends");
            let chosen = group.next_in_line;
            group.place = (group.place + 1) % group.ids.len();
            group.next_in_line = group.ids[group.place];
            // The next in line has had as many turns as the chosen one had, so it has
            // the same credit, unless the group has come round to its first again.
            if group.place == 0 {
                group.credit -= length as isize;
            }
            chosen
        })
        .collect()
}

impl Selector for RoundRobin {
    fn select(&self, _key: &[u8], usable: &dyn Fn(BackendId) -> bool) -> Option<BackendId> {
        let len = self.cycle.len();
        (0..len)
            .map(|_| BackendId::from(self.cycle[self.next.fetch_add(1, Ordering::Relaxed) % len]))
            .find(|id| usable(*id))
    }

    fn backends(&self) -> &Backends {
        &self.backends
    }
}

/// Whether backend `a` carries less load for its weight than backend `b`.
fn less_loaded(a: &BackendState, b: &BackendState) -> bool {
    // In-flight requests per unit of weight, compared without division.
    (a.in_flight() + 1) * b.weight < (b.in_flight() + 1) * a.weight
}

/// The usable backend with the fewest requests in flight for its weight; ties go round
/// robin, so that an idle pool still spreads its requests.
struct LeastConnections {
    backends: Backends,
    states: Vec<Arc<BackendState>>,
    next: AtomicUsize,
}

impl Selector for LeastConnections {
    fn select(&self, _key: &[u8], usable: &dyn Fn(BackendId) -> bool) -> Option<BackendId> {
        let count = self.states.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut best: Option<BackendId> = None;
        for id in (start..count).chain(0..start) {
            if !usable(id) {
                continue;
            }
            if best.is_none_or(|b| less_loaded(&self.states[id], &self.states[b])) {
                best = Some(id);
            }
        }
        best
    }

    fn backends(&self) -> &Backends {
        &self.backends
    }
}

/// Two usable backends drawn at random, the less loaded of them: nearly as good as least
/// connections, without looking at every backend.
struct PowerOfTwoChoices {
    backends: Backends,
    states: Vec<Arc<BackendState>>,
}

/// Draws before a pool with few usable backends is searched in full.
const DRAWS: usize = 8;

impl Selector for PowerOfTwoChoices {
    fn select(&self, _key: &[u8], usable: &dyn Fn(BackendId) -> bool) -> Option<BackendId> {
        let count = self.states.len();
        let draw = || {
            (0..DRAWS)
                .map(|_| random_below(count))
                .find(|id| usable(*id))
        };
        let first = draw().or_else(|| (0..count).find(|id| usable(*id)))?;
        let other = |id: &BackendId| *id != first && usable(*id);
        let second = (0..DRAWS)
            .map(|_| random_below(count))
            .find(other)
            .or_else(|| (0..count).find(other));
        Some(match second {
            Some(second) if less_loaded(&self.states[second], &self.states[first]) => second,
            _ => first,
        })
    }

    fn backends(&self) -> &Backends {
        &self.backends
    }
}

/// A random number below `bound`, from a per-thread xorshift generator seeded by the
/// standard library's random hasher keys: cheap, and no two threads draw alike.
fn random_below(bound: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::thread::current().id()) | 1
        });
    }
    let value = STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    });
    (value % bound as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn states(weights: &[usize]) -> Vec<Arc<BackendState>> {
        let metrics = Metrics::new(1);
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let name = format!("10.0.0.{i}:80");
                let health = metrics.backend_health("p", &name, *w);
                Arc::new(BackendState::new("p", name, *w, health))
            })
            .collect()
    }

    fn empty_backends() -> Backends {
        Backends::new(pingora::lb::discovery::Static::new(Default::default()))
    }

    fn picks(
        selector: &dyn Selector,
        usable: &dyn Fn(BackendId) -> bool,
        n: usize,
    ) -> Vec<BackendId> {
        (0..n)
            .map(|_| selector.select(b"", usable).unwrap())
            .collect()
    }

    #[test]
    fn round_robin_interleaves_weights_as_nginx_does() {
        let selector = RoundRobin::new(empty_backends(), &states(&[5, 1, 1]));
        assert_eq!(
            picks(&selector, &|_| true, 14),
            [0, 0, 1, 0, 2, 0, 0].repeat(2)
        );
        // Weights with a common divisor make the same, shorter cycle.
        let selector = RoundRobin::new(empty_backends(), &states(&[200, 400]));
        assert_eq!(selector.cycle, [1, 0, 1]);
    }

    /// nginx's smooth weighted round robin as it is written: one credit per backend.
    fn smooth_cycle_backend_by_backend(weights: &[usize]) -> Vec<u16> {
        let total: usize = weights.iter().sum();
        let mut credits = vec![0isize; weights.len()];
        (0..total)
            .map(|_| {
                for (credit, weight) in credits.iter_mut().zip(weights) {
                    *credit += *weight as isize;
                }
                let pick = (0..credits.len())
                    .max_by_key(|&id| (credits[id], std::cmp::Reverse(id)))
                    .unwrap();
                credits[pick] -= total as isize;
                pick as u16
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn smooth_cycle_by_weight_groups_is_nginx_s_order(
            weights in proptest::collection::vec(1usize..=6, 1..=12),
        ) {
            proptest::prop_assert_eq!(
                smooth_cycle(&weights),
                smooth_cycle_backend_by_backend(&weights)
            );
        }
    }

    #[test]
    fn round_robin_gives_an_unusable_backend_s_turns_to_the_others_evenly() {
        let selector = RoundRobin::new(empty_backends(), &states(&[1, 1, 1]));
        let chosen = picks(&selector, &|id| id != 1, 6);
        assert_eq!(
            chosen.iter().filter(|&&id| id == 0).count(),
            3,
            "{chosen:?}"
        );
        assert_eq!(
            chosen.iter().filter(|&&id| id == 2).count(),
            3,
            "{chosen:?}"
        );
        assert_eq!(selector.select(b"", &|_| false), None);
    }

    #[test]
    fn least_connections_avoids_the_busy_backend_and_honours_weights() {
        let states = states(&[1, 1, 2]);
        let selector = LeastConnections {
            backends: empty_backends(),
            states: states.clone(),
            next: AtomicUsize::new(0),
        };
        let _busy = [states[0].start_request(), states[0].start_request()];
        let _one = states[1].start_request();
        let _two = [states[2].start_request(), states[2].start_request()];
        // Loads per weight: 0 → 3/1, 1 → 2/1, 2 → 3/2.
        assert_eq!(selector.select(b"", &|_| true), Some(2));
        assert_eq!(selector.select(b"", &|id| id != 2), Some(1));
        assert_eq!(selector.select(b"", &|_| false), None);
    }

    #[test]
    fn least_connections_spreads_an_idle_pool() {
        let states = states(&[1, 1, 1]);
        let selector = LeastConnections {
            backends: empty_backends(),
            states,
            next: AtomicUsize::new(0),
        };
        let picks: std::collections::HashSet<_> =
            (0..3).map(|_| selector.select(b"", &|_| true)).collect();
        assert_eq!(picks.len(), 3, "{picks:?}");
    }

    #[test]
    fn two_choices_never_picks_the_more_loaded_of_two() {
        let states = states(&[1, 1]);
        let selector = PowerOfTwoChoices {
            backends: empty_backends(),
            states: states.clone(),
        };
        let _busy = states[0].start_request();
        for _ in 0..100 {
            assert_eq!(selector.select(b"", &|_| true), Some(1));
        }
        assert_eq!(selector.select(b"", &|id| id == 0), Some(0));
        assert_eq!(selector.select(b"", &|_| false), None);
    }
}
