//! The pin directory (`--pin`): what an earlier agent left there, as the
//! kernel reports it, and replacing its entries one rename at a time.
//!
//! Layout: `map_<NAME>` per map, `link_<program>` per program, and
//! `object`, a symbolic link whose target names the agent and eBPF object
//! that last completed an attach there (for people and log lines; the
//! agent decides from what the kernel reports, not from it). Entries
//! being put in place are first pinned as `new_<entry>`: bpffs renames
//! replace in one step, so a crash leaves either the old entry or the new
//! one, and at worst a `new_` entry that the next start removes.

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData, MapInfo};

use super::{
    BpfError, sys,
    upgrade::{MapDef, MapInUse, ProgramView, kernel_name},
};

/// The version marker's name in the pin directory.
const MARKER: &str = "object";
/// Prefix of entries being put in place (bpffs names cannot hold dots).
const STAGED: &str = "new_";

pub fn map_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("map_{name}"))
}

pub fn link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

fn staged(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{STAGED}{name}"))
}

fn survey_err(path: &Path) -> impl FnOnce(io::Error) -> BpfError + '_ {
    move |source| BpfError::Survey {
        path: path.to_owned(),
        source,
    }
}

/// A pinned link and the program it runs.
pub struct PinnedProgram {
    pub path: PathBuf,
    pub link: OwnedFd,
    pub link_id: u32,
    /// The program it runs, unless this agent may not open programs by id
    /// (that takes CAP_SYS_ADMIN, which `run` and `sidecar` can do
    /// without): it then replaces the program without looking.
    pub running: Option<Running>,
}

/// The program a pinned link runs.
pub struct Running {
    /// Held so the swap can name the program it replaces (the kernel
    /// refuses it if the link runs another one by then).
    pub prog: OwnedFd,
    pub view: ProgramView,
}

/// What the pin directory held when this agent started.
pub struct Survey {
    pub dir: PathBuf,
    /// `(name, map id, definition)` of each pinned map.
    maps: Vec<(&'static str, u32, MapDef)>,
    /// `(program name, link)` of each pinned link.
    links: Vec<(&'static str, PinnedProgram)>,
    /// The marker's text, if there is one.
    pub marker: Option<String>,
    /// Whether any link was pinned (not a first start there).
    pub had_links: bool,
}

impl Survey {
    /// Reads the pins of `programs` and `maps` under `dir`, and removes
    /// entries an interrupted start left staged.
    pub fn take(
        dir: &Path,
        programs: &[&'static str],
        maps: &[&'static str],
    ) -> Result<Self, BpfError> {
        remove_staged(dir)?;
        let mut survey = Self {
            dir: dir.to_owned(),
            maps: Vec::new(),
            links: Vec::new(),
            marker: std::fs::read_link(dir.join(MARKER))
                .ok()
                .map(|t| t.to_string_lossy().into_owned()),
            had_links: false,
        };
        for &name in maps {
            let path = map_path(dir, name);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path).map_err(|source| BpfError::PinnedMap {
                path: path.clone(),
                source: Box::new(source),
            })?;
            survey.maps.push((name, info.id(), def_of(&info)));
        }
        survey.had_links = programs.iter().any(|name| link_path(dir, name).exists());
        for &name in programs {
            let path = link_path(dir, name);
            if !path.exists() {
                continue;
            }
            let link = sys::obj_get(&path).map_err(survey_err(&path))?;
            let (link_id, prog_id) = sys::link_ids(link.as_fd()).map_err(survey_err(&path))?;
            let running = match sys::prog_fd_by_id(prog_id) {
                Ok(prog) => {
                    let view = view_of(prog.as_fd()).map_err(survey_err(&path))?;
                    Some(Running { prog, view })
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    tracing::info!(
                        program = name,
                        "without CAP_SYS_ADMIN the program a pinned link runs cannot be read: this agent's replaces it"
                    );
                    None
                }
                Err(e) => return Err(survey_err(&path)(e)),
            };
            survey.links.push((
                name,
                PinnedProgram {
                    path,
                    link,
                    link_id,
                    running,
                },
            ));
        }
        Ok(survey)
    }

    /// The definition of the map pinned as `name`.
    pub fn pinned(&self, name: &str) -> Option<(u32, MapDef)> {
        self.maps
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, id, def)| (*id, *def))
    }

    /// The maps named `name` that the pinned links' programs read.
    pub fn in_use(&self, name: &str) -> Vec<MapInUse> {
        let mut seen = BTreeSet::new();
        self.links
            .iter()
            .filter_map(|(_, l)| l.running.as_ref())
            .flat_map(|r| r.view.maps_named(name))
            .filter(|m| seen.insert(m.id))
            .cloned()
            .collect()
    }

    /// The pinned map `name` and those of that name the pinned programs
    /// read, except the map `keep`: what a map replacing them takes over.
    pub fn replaced_ids(&self, name: &str, keep: u32) -> Vec<u32> {
        let mut ids: BTreeSet<u32> = self.in_use(name).iter().map(|m| m.id).collect();
        ids.extend(self.pinned(name).map(|(id, _)| id));
        ids.remove(&keep);
        ids.into_iter().collect()
    }

    /// The pinned link of `program`, taken out of the survey.
    pub fn take_link(&mut self, program: &str) -> Option<PinnedProgram> {
        let at = self.links.iter().position(|(n, _)| *n == program)?;
        Some(self.links.remove(at).1)
    }

    /// Pins the map the programs read (id `id`) as `name` again.
    pub fn repin(&self, name: &str, id: u32) -> Result<(), BpfError> {
        let path = map_path(&self.dir, name);
        let map = MapData::from_id(id).map_err(|source| BpfError::PinnedMap {
            path: path.clone(),
            source: Box::new(source),
        })?;
        map.pin(&path)
            .map_err(|source| BpfError::Pin { path, source })
    }

    /// Pins `map` beside the map pinned as `name`, to replace it with
    /// [`Survey::commit_map`] once the programs read it.
    pub fn stage_map(&self, name: &str, map: &Map) -> Result<(), BpfError> {
        let path = staged(&map_path(&self.dir, name));
        map.pin(&path)
            .map_err(|source| BpfError::Pin { path, source })
    }

    /// Puts the map staged for `name` in place of the pinned one.
    pub fn commit_map(&self, name: &str) -> Result<(), BpfError> {
        let path = map_path(&self.dir, name);
        std::fs::rename(staged(&path), &path).map_err(|source| BpfError::PinFile { path, source })
    }

    /// Points the marker at `text`.
    pub fn write_marker(&self, text: &str) -> Result<(), BpfError> {
        let path = self.dir.join(MARKER);
        let pin_err = |source: io::Error| BpfError::PinFile {
            path: path.clone(),
            source,
        };
        let new = staged(&path);
        std::os::unix::fs::symlink(text, &new).map_err(pin_err)?;
        std::fs::rename(&new, &path).map_err(pin_err)
    }
}

fn remove_staged(dir: &Path) -> Result<(), BpfError> {
    let entries = std::fs::read_dir(dir).map_err(survey_err(dir))?;
    for entry in entries {
        let entry = entry.map_err(survey_err(dir))?;
        if entry.file_name().to_string_lossy().starts_with(STAGED) {
            tracing::info!(path = %entry.path().display(), "removing an entry an interrupted start left staged");
            std::fs::remove_file(entry.path()).map_err(survey_err(&entry.path()))?;
        }
    }
    Ok(())
}

pub fn def_of(info: &MapInfo) -> MapDef {
    MapDef {
        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }
}

/// What the kernel says about the program behind `prog`: its tag, the
/// maps it reads, and its read-only data.
pub fn view_of(prog: BorrowedFd<'_>) -> io::Result<ProgramView> {
    let facts = sys::prog_facts(prog)?;
    let mut maps = Vec::new();
    let mut settings = Vec::new();
    for id in facts.map_ids {
        let info = MapInfo::from_id(id).map_err(io::Error::other)?;
        let name = info.name_as_str().unwrap_or_default().to_owned();
        if name.starts_with(kernel_name(".rodata")) {
            let data = MapData::from_id(id).map_err(io::Error::other)?;
            let bytes = sys::map_lookup(
                data.fd().as_fd(),
                &0u32.to_ne_bytes(),
                info.value_size() as usize,
            )?;
            settings.extend(bytes.unwrap_or_default());
        }
        maps.push(MapInUse {
            id,
            name,
            def: def_of(&info),
        });
    }
    Ok(ProgramView {
        id: facts.id,
        tag: facts.tag,
        maps,
        settings,
    })
}
