/**
 * Whether a notebook on disk differs from the page's last loaded or saved
 * version only by what the server writes (outputs, execution counts, the
 * `chspawner` metadata): then the page, which has rendered all of that
 * itself, may save over it without asking "File Changed". Pure.
 */

/** The parts of a notebook only its user changes: each cell's id, type and source. */
export function sourcesOf(notebook: any): string {
  const cells: any[] = Array.isArray(notebook?.cells) ? notebook.cells : [];
  return JSON.stringify(
    cells.map(cell => [
      cell?.id ?? '',
      cell?.cell_type ?? '',
      Array.isArray(cell?.source) ? cell.source.join('') : String(cell?.source ?? '')
    ])
  );
}

/** `metadata.chspawner.outputs` of a notebook: which kernel's output it holds, up to which seq. */
export interface IOutputsRecord {
  kernel_id: string;
  seq: number;
}

export function outputsRecord(notebook: any): IOutputsRecord | null {
  const record = notebook?.metadata?.chspawner?.outputs;
  if (
    record &&
    typeof record.kernel_id === 'string' &&
    typeof record.seq === 'number' &&
    Number.isSafeInteger(record.seq)
  ) {
    return { kernel_id: record.kernel_id, seq: record.seq };
  }
  return null;
}

/**
 * Whether the page may take ``disk`` as its own last save: the same cells
 * and sources as the page's last load or save (``lastSources``), and outputs
 * of the kernel the page follows up to a seq the page has rendered.
 */
export function onlyServerWrites(
  disk: any,
  lastSources: string,
  kernelId: string,
  renderedSeq: number | null
): boolean {
  const record = outputsRecord(disk);
  return (
    record !== null &&
    record.kernel_id === kernelId &&
    renderedSeq !== null &&
    record.seq <= renderedSeq &&
    sourcesOf(disk) === lastSources
  );
}
