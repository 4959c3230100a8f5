"""Render the extension's screenshot (Resources/Screenshot01.png) from real MRML nodes, offscreen.

What it shows is the product's output: a real CT, segmented by a shipped model (``meddiffseg
segment ... --out DIR``, the same worker output the module reads back), loaded into MRML nodes by the
module's own code (``buildResultNodes``: segmentation with terminology and colours, the uncertainty
volume), the overlay set by the module's Logic (transparent below its threshold, colour legend with
units), and drawn by Slicer's own pipeline: ``vtkMRMLSliceLogic`` blends the CT and the overlay for an
axial slice view, and the slice view's displayable managers (segmentation outlines and fill, colour
legend) draw into a VTK render window that renders offscreen (EGL/OSMesa; no desktop needed).

    meddiffseg segment example_ct.nii.gz --modality CT --model abdomen-ct \\
        --organ liver --organ spleen --organ kidney_right --organ kidney_left --samples 5 --out /tmp/shot
    python Testing/slicer/render_screenshot.py --ct example_ct.nii.gz --results /tmp/shot \\
        --out Resources/Screenshot01.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "MedDiffSeg"))

import slicer_harness  # noqa: E402


def render(ct: Path, results: Path, out: Path, size=(960, 720), slice_index: int | None = None,
           threshold: float | None = None, opacity: float | None = None) -> dict:
    """Render; the overlay's threshold and opacity default to the panel's defaults."""
    import numpy as np
    import vtk

    slicer = slicer_harness.import_slicer()
    slicer_harness.install_standins(slicer)
    env = slicer_harness.MRMLEnvironment(slicer).activate()
    module = slicer_harness.load_module(slicer)
    from MedDiffSegLogicLib import nodes
    from MedDiffSegLogicLib.segmentation import buildResultNodes

    threshold = nodes.DEFAULT_THRESHOLD if threshold is None else threshold
    opacity = 0.5 if opacity is None else opacity  # the parameter node's uncertaintyOpacity default
    scene = env.scene
    volume = slicer_harness.load_through_storage_node(slicer, scene, ct, "CT")
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(400, 40)  # abdomen window
    display.SetInterpolate(1)
    labels, _, _ = nodes.readVolumeFile(str(results / "segmentation.nii.gz"), label=True)
    uncertainty, _, _ = nodes.readVolumeFile(str(results / "uncertainty.nii.gz"))
    summary = json.loads((results / "summary.json").read_text())
    if slice_index is None:  # the axial slice (k) showing the most of the segmented organs
        counts = [len(np.unique(labels[k])) * 1e6 + np.count_nonzero(labels[k]) for k in range(labels.shape[0])]
        slice_index = int(np.argmax(counts))

    # An axial slice view as the application makes one: slice logic + render window + displayable managers.
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(env.appLogic)
    slice_logic.SetMRMLScene(scene)
    slice_node = slice_logic.AddSliceNode("Red")
    env.appLogic.GetSliceLogics().AddItem(slice_logic)  # as the application registers its views' slice logics
    slice_node.SetOrientation("Axial")
    slice_node.SetDimensions(size[0], size[1], 1)
    composite = slice_logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(volume.GetID())
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.SetNumberOfLayers(3)  # as Slicer's views: the colour legend is drawn on a layer of its own
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    window.AddRenderer(renderer)
    mapper = vtk.vtkImageMapper()
    mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    image_actor = vtk.vtkActor2D()
    image_actor.SetMapper(mapper)
    renderer.AddViewProp(image_actor)
    interactor = vtk.vtkGenericRenderWindowInteractor()  # never started: the managers only need one to exist
    interactor.SetRenderWindow(window)
    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(env.appLogic)
    for name in ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLColorLegendDisplayableManager"):
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = factory.InstantiateDisplayableManagers(renderer)
    group.SetMRMLDisplayableNode(slice_node)

    # The module's own code puts the result into the scene and shows it.
    from MedDiffSegLib.registry import package_info

    package = package_info(summary["model"]["name"])
    organs = [package.organs[i].to_dict() for i in package.organ_ids([o["name"] for o in summary["organs"]])]
    result = buildResultNodes(volume, labels, uncertainty, organs, summary)
    segmentation_display = result.segmentationNode.GetDisplayNode()
    segmentation_display.SetOpacity2DFill(0.3)
    segmentation_display.SetOpacity2DOutline(1.0)
    module.MedDiffSegLogic().showUncertainty(result, True, opacity=opacity, threshold=threshold, legend=True)
    slice_logic.FitSliceToAll()
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    centre = [(d - 1) / 2.0 for d in volume.GetImageData().GetDimensions()]
    ras = ijk_to_ras.MultiplyPoint([centre[0], centre[1], slice_index, 1.0])
    slice_node.SetSliceOffset(ras[2])
    slice_node.Modified()
    composite.Modified()
    slice_logic.GetImageDataConnection().GetProducer().Update()
    group.RequestRender()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(out))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return {"slice": slice_index, "window": type(window).__name__, "size": list(size), "threshold": threshold,
            "opacity": opacity, "colour_map": result.uncertaintyNode.GetDisplayNode().GetColorNodeID(),
            "model": summary["model"]["name"], "settings": summary["settings"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", required=True, type=Path)
    parser.add_argument("--results", required=True, type=Path, help="the --out folder of meddiffseg segment")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--slice", type=int, default=None, help="axial slice index (default: the one with most organs)")
    parser.add_argument("--threshold", type=float, default=None, help="default: the panel's")
    parser.add_argument("--opacity", type=float, default=None, help="default: the panel's")
    args = parser.parse_args(argv)
    info = render(args.ct, args.results, args.out, slice_index=args.slice, threshold=args.threshold,
                  opacity=args.opacity)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
