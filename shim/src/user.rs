//! `--user` and the image's `User`, resolved against the container's own /etc/passwd and
//! /etc/group (never the host's).

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: String,
}

#[derive(Debug, Error, PartialEq)]
pub enum UserError {
    #[error("user {0:?} not found in the image's /etc/passwd: give a user the image has, or a numeric uid")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group: give a group the image has, or a numeric gid")]
    UnknownGroup(String),
    #[error("user {0:?} is not valid: use NAME, UID, NAME:GROUP or UID:GID")]
    Malformed(String),
}

/// Reads `rel` (e.g. etc/passwd) under `rootfs` unless a symlink is on the way: a link
/// could point at the host's file.
fn read_image_file(rootfs: &Path, rel: &str) -> String {
    let mut p = rootfs.to_path_buf();
    for part in rel.split('/') {
        p.push(part);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if !m.file_type().is_symlink() => {}
            _ => return String::new(),
        }
    }
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(&p) {
        use std::io::Read;
        let _ = f.take(4 << 20).read_to_string(&mut text);
    }
    text
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(rootfs: &Path) -> Vec<Passwd> {
    read_image_file(rootfs, "etc/passwd")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(Passwd {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// (name, gid, members)
fn groups(rootfs: &Path) -> Vec<(String, u32, Vec<String>)> {
    read_image_file(rootfs, "etc/group")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolves `spec` (empty: root) as Docker does: a name must exist; a numeric uid need not.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<ResolvedUser, UserError> {
    let spec = if spec.is_empty() { "0" } else { spec };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(UserError::Malformed(spec.to_string()));
    }
    let entries = passwd(rootfs);
    let found = match user.parse::<u32>() {
        Ok(uid) => entries.iter().find(|p| p.uid == uid),
        Err(_) => Some(
            entries
                .iter()
                .find(|p| p.name == user)
                .ok_or_else(|| UserError::UnknownUser(user.to_string()))?,
        ),
    };
    let uid = match user.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => found.map(|p| p.uid).unwrap_or_default(),
    };
    let groups = groups(rootfs);
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
        None => found.map(|p| p.gid).unwrap_or(0),
    };
    let mut additional_gids = Vec::new();
    if group.is_none() {
        if let Some(p) = found {
            for (_, g, members) in &groups {
                if members.contains(&p.name) && *g != gid && !additional_gids.contains(g) {
                    additional_gids.push(*g);
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: found
            .map(|p| p.home.clone())
            .unwrap_or_else(|| "/".to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hull-user-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nhull:x:1000:1000:hull:/home/hull:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("etc/group"),
            "root:x:0:\nhull:x:1000:\nwheel:x:10:hull\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn names_ids_and_groups_resolve_like_docker() {
        let r = rootfs();
        assert_eq!(resolve(&r, "").unwrap().uid, 0);
        let hull = resolve(&r, "hull").unwrap();
        assert_eq!(
            (
                hull.uid,
                hull.gid,
                hull.additional_gids.clone(),
                hull.home.as_str()
            ),
            (1000, 1000, vec![10], "/home/hull")
        );
        assert_eq!(resolve(&r, "4242").unwrap().gid, 0);
        assert_eq!(resolve(&r, "hull:wheel").unwrap().gid, 10);
        assert_eq!(
            resolve(&r, "nobody"),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            resolve(&r, "hull:staff"),
            Err(UserError::UnknownGroup("staff".into()))
        );
        assert_eq!(
            resolve(&r, "hull:"),
            Err(UserError::Malformed("hull:".into()))
        );
    }
}
