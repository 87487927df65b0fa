import Foundation
import LogPool

/// The write-time checks of Specs/CRASH-MODEL.md §4, run on every write the
/// workload's device receives, so an ordering bug fails at the offending write (with its
/// call stack) instead of waiting for a crash state to expose it.
///
/// - W1 `overwrite-durable`: after every sync the durable image is walked from its newest
///   valid slot (`Pool.referencedExtents`: root, pages, blocks, journal from the replay
///   start to the stop); a later write touching one of those physical sectors is a
///   violation. Slots are checked by W4 instead.
/// - W2 `rewrite-synced-sector`: the W1 case where the protected sector is journal, or the
///   write covers the protected physical sector only partly (a torn read-modify-write
///   would destroy the synced bytes beside it).
/// - W3 `pointer-before-pointee`: a superblock slot is written while other writes are
///   still pending (everything a slot makes reachable must already be durable).
/// - W4 `slot`: the slot written is a whole, valid slot; it is not the one open would
///   choose now; its generation is higher and its parent checksum is the chosen slot's.
/// - W5 `reuse-lag`: LogPool reuses pages once the checkpoint that freed them is durable
///   (the short lag, Specs/COMMIT.md §5.2), so W1 protects only the newest slot's state;
///   a fallback to the older slot must then detect reused pages (checked by the C6/C7
///   classes, which require `corrupt`, never silent wrong data). The records the older
///   slot replays and their data get the long lag (R-4), checked by those classes and
///   by `CrashRegressionTests`.
public final class WriteChecks {
    public let physicalSectorByteCount: Int
    /// Physical sector index → the structure the durable state keeps there.
    private var protected: [Int: String] = [:]
    private var chosen: Superblock? = nil
    public private(set) var checkedWrites = 0
    /// Called with (check name, detail) for each violation.
    public var onViolation: ((String, String) -> Void)? = nil

    public init(physicalSectorByteCount: Int) {
        self.physicalSectorByteCount = physicalSectorByteCount
    }

    /// Hooks the checks into `device`'s writes and syncs.
    public func attach(to device: SimulatedDevice) {
        refresh(device)
        device.beforeWrite = { device, offset, bytes in self.check(device, offset, bytes) }
        device.afterSync = { device in self.refresh(device) }
    }

    /// Recomputes what the durable image references.
    private func refresh(_ device: SimulatedDevice) {
        protected.removeAll(keepingCapacity: true)
        chosen = Self.newestSlot(device.durable)
        guard chosen != nil else { return }
        let extents: [ReferencedExtent]
        do {
            extents = try Pool.referencedExtents(on: OverlayDevice(base: device.durable))
        } catch {
            onViolation?("overwrite-durable", "the durable image cannot be walked: \(error)")
            return
        }
        for extent in extents where extent.byteCount > 0 {
            let first = Int(extent.byteOffset) / physicalSectorByteCount
            let last = Int(extent.byteOffset + extent.byteCount - 1) / physicalSectorByteCount
            for sector in first...last { protected[sector] = extent.structure }
        }
    }

    private func check(_ device: SimulatedDevice, _ offset: Int, _ bytes: UnsafeRawBufferPointer) {
        checkedWrites += 1
        guard bytes.count > 0 else { return }
        if offset < Int(PoolGeometry.journalByteOffset) {
            checkSlotWrite(device, offset, bytes)
            return
        }
        let first = offset / physicalSectorByteCount, last = (offset + bytes.count - 1) / physicalSectorByteCount
        for sector in first...last {
            guard let structure = protected[sector] else { continue }
            let start = sector * physicalSectorByteCount
            let partial = offset > start || offset + bytes.count < start + physicalSectorByteCount
            let check = structure == "journal" || partial ? "rewrite-synced-sector" : "overwrite-durable"
            onViolation?(check, "write of \(bytes.count) bytes at byte offset \(offset) touches the \(physicalSectorByteCount)-byte sector at \(start), which holds \(structure) bytes the durable state references; called from \(Self.callSite())")
            return
        }
    }

    private func checkSlotWrite(_ device: SimulatedDevice, _ offset: Int, _ bytes: UnsafeRawBufferPointer) {
        let slots = PoolGeometry.superblockSlotByteOffsets.map { Int($0) }
        guard let index = slots.firstIndex(of: offset), bytes.count == PoolGeometry.superblockByteCount else {
            onViolation?("slot", "write of \(bytes.count) bytes at byte offset \(offset) is not one whole superblock slot; called from \(Self.callSite())")
            return
        }
        if !device.pending.isEmpty {
            onViolation?("pointer-before-pointee", "superblock slot \(index == 0 ? "A" : "B") written while \(device.pending.count) writes are not yet durable; called from \(Self.callSite())")
        }
        guard let chosen else { return }  // pool creation: no slot is valid yet
        let new: Superblock
        do {
            new = try Superblock.decode(Array(bytes), slotIndex: index)
        } catch {
            onViolation?("slot", "slot \(index == 0 ? "A" : "B") is written with bytes that do not decode: \(error); called from \(Self.callSite())")
            return
        }
        if index == chosen.slotIndex {
            onViolation?("slot", "slot \(index == 0 ? "A" : "B") is written, but it holds the newest durable commit (generation \(chosen.generation)); called from \(Self.callSite())")
        } else if new.generation <= chosen.generation {
            onViolation?("slot", "new slot generation \(new.generation) is not above the chosen \(chosen.generation); called from \(Self.callSite())")
        } else if new.parentChecksum != chosen.checksum {
            onViolation?("slot", "new slot's parent checksum \(new.parentChecksum) is not the chosen slot's \(chosen.checksum); called from \(Self.callSite())")
        }
    }

    /// The newest valid slot of `image` (nil when neither slot decodes).
    public static func newestSlot(_ image: [UInt8]) -> Superblock? {
        var newest: Superblock? = nil
        for slot in 0..<2 {
            let offset = Int(PoolGeometry.superblockSlotByteOffsets[slot])
            guard image.count >= offset + PoolGeometry.superblockByteCount,
                  let sb = try? Superblock.decode(Array(image[offset..<offset + PoolGeometry.superblockByteCount]), slotIndex: slot)
            else { continue }
            if sb.generation > newest?.generation ?? 0 { newest = sb }
        }
        return newest
    }

    /// The call stack of the offending write, as `binary(+offset)` frames (Linux exports
    /// no symbol names for them: `addr2line -f -C -e <binary> <offset>` names each),
    /// skipping Foundation and these checks' own frames.
    static func callSite() -> String {
        let frames = Thread.callStackSymbols.dropFirst(3).prefix(8).map { line -> String in
            let text = line.split(separator: " ").first.map(String.init) ?? line
            return text.split(separator: "/").last.map(String.init) ?? text
        }
        return frames.joined(separator: " <- ")
    }
}
