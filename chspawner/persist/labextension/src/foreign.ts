/**
 * Output of executions this page did not ask for, put into their cells.
 *
 * JupyterLab shows a kernel's output only through the request that caused it
 * (a future of the kernel connection); output of an execution another page
 * started (the page before a reload, another browser) is dropped. The server
 * marks such messages, when it replays them, with `metadata.chspawner_cell`
 * (the cell's id, from chspawner.persist.records.CellMap). From the first
 * marked message of an execution on, every message of that execution (its
 * later, live ones carry no mark) goes to that cell: execution count, streams,
 * displays, results, errors, clears, as JupyterLab would show them. A marked
 * message also carries the execution's count (`metadata.chspawner_count`)
 * when the server saw it begin: a page that joined after its execute_input
 * still shows the cell's count.
 *
 * Pure: cells are reached through the small interfaces below, so the unit
 * tests drive it without JupyterLab.
 */

/** What of a cell's output model this needs (JupyterLab's IOutputAreaModel). */
export interface IOutputsLike {
  /** Add an output (consecutive streams of one name are merged by JupyterLab). */
  add(output: any): number;
  /** Clear now, or (``wait``) just before the next output is added. */
  clear(wait?: boolean): void;
}

/** What of a code cell this needs (JupyterLab's ICodeCellModel). */
export interface ICellLike {
  outputs: IOutputsLike;
  executionCount: number | null;
}

/** A kernel message, as JupyterLab hands it on (KernelMessage.IMessage). */
export interface IMessageLike {
  header: { msg_id: string; msg_type: string };
  parent_header: { msg_id?: string } | Record<string, never>;
  metadata: Record<string, any>;
  content: any;
  channel?: string;
}

/** Parent msg_ids remembered at most (own requests, foreign executions). */
const REMEMBERED = 10000;

export class ForeignOutputs {
  /**
   * @param findCell - the code cell with this id in the notebook, or null
   */
  constructor(findCell: (cellId: string) => ICellLike | null) {
    this._findCell = findCell;
  }

  /** A message this page sent: its replies and output are JupyterLab's own. */
  sent(msg: IMessageLike): void {
    remember(this._own, msg.header.msg_id, true);
  }

  /**
   * An IOPub message JupyterLab has handled: put it into its cell if it
   * belongs to an execution of another page. Returns whether it did.
   */
  received(msg: IMessageLike): boolean {
    const parent = (msg.parent_header as { msg_id?: string })?.msg_id;
    if (!parent || this._own.has(parent)) {
      return false;
    }
    const marked = msg.metadata?.chspawner_cell;
    const cellId = typeof marked === 'string' && marked ? marked : this._foreign.get(parent);
    if (cellId === undefined) {
      return false;
    }
    const first = !this._foreign.has(parent);
    remember(this._foreign, parent, cellId);
    const cell = this._findCell(cellId);
    if (cell === null) {
      return false;
    }
    // The count the execution began as, for a page that joined it after
    // its execute_input (reloaded mid-cell): the cell shows it when done.
    const count = msg.metadata?.chspawner_count;
    const counted = typeof count === 'number' && cell.executionCount !== count;
    if (counted) {
      cell.executionCount = count;
    }
    return apply(cell, msg, first) || counted;
  }

  private _findCell: (cellId: string) => ICellLike | null;
  private _own = new Map<string, true>();
  private _foreign = new Map<string, string>();
}

/** One IOPub message into ``cell``, as JupyterLab's output area would show it. */
export function apply(cell: ICellLike, msg: IMessageLike, first = false): boolean {
  const content = msg.content ?? {};
  switch (msg.header.msg_type) {
    case 'execute_input':
      // The execution starts here: JupyterLab clears a cell it runs.
      if (first) {
        cell.outputs.clear();
      }
      cell.executionCount = content.execution_count ?? null;
      return true;
    case 'stream':
      cell.outputs.add({ output_type: 'stream', name: content.name, text: content.text });
      return true;
    case 'display_data':
      cell.outputs.add({
        output_type: 'display_data',
        data: content.data ?? {},
        metadata: content.metadata ?? {}
      });
      return true;
    case 'execute_result':
      cell.outputs.add({
        output_type: 'execute_result',
        data: content.data ?? {},
        metadata: content.metadata ?? {},
        execution_count: content.execution_count ?? null
      });
      return true;
    case 'error':
      cell.outputs.add({
        output_type: 'error',
        ename: content.ename,
        evalue: content.evalue,
        traceback: content.traceback ?? []
      });
      return true;
    case 'clear_output':
      cell.outputs.clear(Boolean(content.wait));
      return true;
    default:
      // status, update_display_data (needs the display's earlier output,
      // which JupyterLab tracks only for its own requests), comms: nothing
      // to show in the cell.
      return false;
  }
}

function remember<V>(map: Map<string, V>, key: string, value: V): void {
  map.delete(key);
  map.set(key, value);
  if (map.size > REMEMBERED) {
    map.delete(map.keys().next().value as string);
  }
}
