//! The simulator camera's render settings, shared by `openvla eval metaworld` and
//! `openvla sim demos metaworld` (the Python side: `python/sim/openvla_sim/sim.py`, `Camera`).

/// How the corner4 camera renders a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Render {
    /// Multisampling off (`offsamples = 0`), shadows and reflections off: about 10-30 ms a frame
    /// on llvmpipe instead of 100-180 ms. Edges are aliased and the arm casts no shadow.
    Fast,
    /// MuJoCo's defaults (4x multisampling, shadows, reflections): pixel-identical to Meta-World's
    /// own `env.render()`, which LeRobot's evaluation and `lerobot/metaworld_mt50` use.
    Default,
}

impl Render {
    /// The flag's value (`fast`, `default`), as the Python workers read it.
    pub fn name(self) -> &'static str {
        match self {
            Render::Fast => "fast",
            Render::Default => "default",
        }
    }

    /// The camera as recorded in results.json and a dataset's provenance.
    pub fn camera(self) -> &'static str {
        match self {
            Render::Fast => {
                "corner4 (rotated 180 degrees; fast render: offsamples 0, no shadows or reflections)"
            }
            Render::Default => {
                "corner4 (rotated 180 degrees; MuJoCo's default render: 4x MSAA, shadows, reflections)"
            }
        }
    }

    /// The value recorded in a run's configuration: none for `fast`, so that runs from before
    /// the flag (all fast) still resume.
    pub fn recorded(self) -> Option<&'static str> {
        (self != Render::Fast).then(|| self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_python_side() {
        // sim.py's list of the settings its Camera accepts, in this enum's order.
        let py = include_str!("../../../python/sim/openvla_sim/sim.py");
        let names: Vec<String> = [Render::Fast, Render::Default]
            .iter()
            .map(|r| format!("{:?}", r.name()))
            .collect();
        let line = format!("RENDERS = ({})", names.join(", "));
        assert!(py.contains(&line), "sim.py has no `{line}`");
        assert_eq!(Render::Fast.recorded(), None);
        assert_eq!(Render::Default.recorded(), Some("default"));
    }
}
