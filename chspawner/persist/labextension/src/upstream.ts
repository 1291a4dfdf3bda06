/**
 * Every part of JupyterLab the extension uses that is not its public API, and
 * nothing else. Each is checked where it is used: a JupyterLab without it
 * gets a line in the browser's console and JupyterLab's own behaviour (here:
 * its "File Changed" dialog), never an error.
 */

/**
 * Take ``disk`` (a contents model of the file, with hash) as the document's
 * last save, so that its next save does not ask "File Changed".
 * JupyterLab 4's Context keeps the file's last known hash and modification
 * time in the private `_contentsModel`, set only by `_updateContentsModel`
 * (at load, save and rename); its `_maybeSave` compares them with the disk's.
 */
export function acceptDiskVersion(context: unknown, disk: any): boolean {
  const update = (context as any)?._updateContentsModel;
  const known = (context as any)?.contentsModel;
  if (typeof update !== 'function' || !known) {
    console.warn(
      '[chspawner] this JupyterLab has no DocumentContext._updateContentsModel: ' +
        'a save after the server wrote outputs into the notebook will ask "File Changed"'
    );
    return false;
  }
  update.call(context, {
    ...known,
    last_modified: disk.last_modified,
    hash: disk.hash,
    hash_algorithm: disk.hash_algorithm
  });
  return true;
}
